"""Declarative weight mappings between Hugging Face names and megatron-core's global tensors.

A family module lists `Param`s: a megatron key, the HF tensor names it is made of (`{i}` is the
layer index for stacked per-layer keys) and a `Transform` that turns the HF tensors into one
megatron tensor and back. The same list drives HF -> Megatron, Megatron -> HF, .nemo and the
TensorRT-LLM export, so a layout fact (QKV order, gate/up order, vocab padding) lives in one place.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch


class Transform(abc.ABC):
    @abc.abstractmethod
    def to_megatron(self, hf: list[torch.Tensor]) -> torch.Tensor: ...

    @abc.abstractmethod
    def to_hf(self, megatron: torch.Tensor) -> list[torch.Tensor]: ...


class Same(Transform):
    def to_megatron(self, hf):
        return hf[0]

    def to_hf(self, megatron):
        return [megatron]


class Transposed(Transform):
    """GPT-2's Conv1D stores weights as (in, out); Linear is (out, in)."""

    def to_megatron(self, hf):
        return hf[0].t().contiguous()

    def to_hf(self, megatron):
        return [megatron.t().contiguous()]


@dataclass
class InterleavedQKV(Transform):
    """HF keeps q, k and v apart (or GPT-2 concatenates them as [q; k; v]); megatron-core fuses
    them group by group: for each KV head g, its query heads, then k_g, then v_g. Works for
    weights (rows) and biases alike."""

    heads: int
    kv_heads: int
    head_dim: int
    fused_input: bool = False  # GPT-2: one (3h, ...) tensor instead of three
    transpose: bool = False  # GPT-2's Conv1D weight

    def _split(self, q, k, v):
        per = self.heads // self.kv_heads
        d = self.head_dim
        rest = q.shape[1:]
        q = q.reshape(self.kv_heads, per * d, *rest)
        k = k.reshape(self.kv_heads, d, *rest)
        v = v.reshape(self.kv_heads, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_megatron(self, hf):
        if self.fused_input:
            fused = hf[0].t() if self.transpose else hf[0]
            q, k, v = fused.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                   self.kv_heads * self.head_dim])
        else:
            q, k, v = hf
        return self._split(q, k, v).contiguous()

    def to_hf(self, megatron):
        per, d = self.heads // self.kv_heads, self.head_dim
        rest = megatron.shape[1:]
        grouped = megatron.reshape(self.kv_heads, (per + 2) * d, *rest)
        q, k, v = grouped.split([per * d, d, d], dim=1)
        q, k, v = (x.reshape(-1, *rest).contiguous() for x in (q, k, v))
        if self.fused_input:
            fused = torch.cat([q, k, v])
            return [fused.t().contiguous() if self.transpose else fused]
        return [q, k, v]


class GateUp(Transform):
    """SwiGLU: megatron-core's linear_fc1 is [gate; up] (its checkpoint splits TP shards to keep it so)."""

    def to_megatron(self, hf):
        return torch.cat(hf).contiguous()

    def to_hf(self, megatron):
        gate, up = megatron.chunk(2)
        return [gate.contiguous(), up.contiguous()]


@dataclass
class PaddedVocab(Transform):
    """Embedding and output rows: megatron pads the vocabulary for TP; the padding rows are zero."""

    vocab: int
    padded: int

    def to_megatron(self, hf):
        table = hf[0]
        if table.shape[0] != self.vocab:
            raise ValueError(f"vocabulary table has {table.shape[0]} rows, config says {self.vocab}")
        pad = table.new_zeros(self.padded - self.vocab, *table.shape[1:])
        return torch.cat([table, pad]).contiguous()

    def to_hf(self, megatron):
        return [megatron[: self.vocab].contiguous()]


@dataclass
class Param:
    megatron: str  # global tensor key; keys under decoder.layers. are stacked over layers
    hf: list[str]  # HF names; {i} is the layer index, {e} the expert's
    transform: Transform = field(default_factory=Same)
    # the layers that have this tensor (None: all); an MoE model's dense layers have an MLP, the others experts
    layers: tuple[int, ...] | None = None
    # routed experts: the global tensor is [layers, experts, ...] and one expert is one HF tensor set
    experts: int = 0

    @property
    def per_layer(self) -> bool:
        return self.megatron.startswith("decoder.layers.")

    def layer_indices(self, num_layers: int) -> list[int]:
        return list(range(num_layers)) if self.layers is None else list(self.layers)

    def expert_indices(self) -> list[int | None]:
        """Each expert of a routed-expert tensor, or [None] for any other."""
        return list(range(self.experts)) if self.experts else [None]

    def hf_names(self, layer: int | None = None, expert: int | None = None) -> list[str]:
        return [name.format(i=layer, e=expert) for name in self.hf]
