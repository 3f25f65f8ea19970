"""Layer-by-layer verification: the source and the converted model on the same hidden states,
one decoder layer of each in memory at a time, so it runs for a 70B model in a layer's worth of
memory, and is on by default at every size.

Each side is its own implementation: an HF directory runs transformers' layer classes (built on
the meta device, one layer materialized and filled at a time); a Megatron or NeMo checkpoint runs
megatron-core's TransformerLayer (kiln's engine, a one-layer GPTModel refilled for each layer).
Both start from the source's embedding output and each layer gets the source's previous output,
so a difference is attributed to the layer that makes it, not carried forward.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kiln.config import ModelConfig, ParallelConfig
from kiln.conversion import hf, moe
from kiln.conversion.mapping import PaddedVocab
from kiln.conversion.verify import TensorSource, fill, locate, one_process_engine
from kiln.errors import ParityError

TOLERANCE = 1e-4  # of max(1, the reference's largest |value|) at that point


class HFSide:
    """transformers' own modules, built on the meta device; a module gets real weights only while it runs."""

    def __init__(self, directory: str | Path):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32,
                                                          attn_implementation="sdpa")  # causal without a mask
        self.model.eval()
        self.reader = hf.Reader(directory)
        self.names = {module: name for name, module in self.model.named_modules()}
        base = self.model.base_model
        self.gpt2 = hasattr(base, "h")
        self.layers = base.h if self.gpt2 else base.layers
        self.num_layers = len(self.layers)
        self.rotary = None if self.gpt2 else type(base.rotary_emb)(config=self.config)  # buffers made on CPU

    def _filled(self, module):
        """`module` on CPU with its tensors read from the directory (a tied head reads the embedding)."""
        module.to_empty(device="cpu")
        prefix = self.names[module]
        tied = self.model.get_input_embeddings()
        with torch.no_grad():
            for name, param in module.named_parameters():
                full = f"{prefix}.{name}" if prefix else name
                if full not in self.reader.names() and module is self.model.lm_head:
                    full = f"{self.names[tied]}.weight"
                tensor = moe.module_tensor(self.config.model_type, self.reader, full)  # experts fused in memory
                param.copy_((self.reader.get(full) if tensor is None else tensor).float())
        return module

    def _release(self, module) -> None:
        module.to("meta")

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        base = self.model.base_model
        table = self._filled(self.model.get_input_embeddings())
        hidden = table(tokens)
        self._release(table)
        if self.gpt2:
            positions = self._filled(base.wpe)
            hidden = hidden + positions(torch.arange(tokens.shape[1]))
            self._release(positions)
        return hidden

    def layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self._filled(self.layers[index])
        kwargs = {}
        if self.rotary is not None:
            positions = torch.arange(hidden.shape[1]).unsqueeze(0)
            kwargs = {"position_embeddings": self.rotary(hidden, positions), "position_ids": positions}
        with torch.no_grad():
            out = layer(hidden.contiguous(), **kwargs)  # MoE blocks view it flat
        self._release(layer)
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        base = self.model.base_model
        norm, lm_head = self._filled(base.ln_f if self.gpt2 else base.norm), self._filled(self.model.lm_head)
        with torch.no_grad():
            logits = lm_head(norm(hidden))
        self._release(norm)
        self._release(lm_head)
        return logits


class MegatronSide:
    """kiln's engine: megatron-core's GPTModel with one decoder layer, refilled for each layer index (an
    MoE model with dense layers has two such models, one of each kind)."""

    def __init__(self, read: TensorSource, m: ModelConfig):
        self._engine = one_process_engine()
        self._engine.__enter__()
        self.read, self.num_layers, self.vocab, self.config = read, m.num_layers, m.vocab_size, m
        kinds = {self._kind(i) for i in range(m.num_layers)}
        self.models = {kind: self._one_layer(kind) for kind in sorted(kinds, reverse=True)}
        self.gpt = self.models[self._kind(0)][0]

    def _kind(self, layer: int) -> str:
        return "moe" if self.config.moe is not None and self.config.moe.is_moe_layer(layer) else "dense"

    def _one_layer(self, kind: str):
        """A one-layer GPTModel of this kind, its whole-model tensors filled, and its layer's sharded tensors
        as (sharded tensor, global-view key, expert)."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

        from kiln.training.model import build_gpt, transformer_config

        m, parallel = self.config, ParallelConfig()
        moe = None if kind == "dense" else dataclasses.replace(m.moe, layer_pattern=None)
        one = dataclasses.replace(m, num_layers=1, moe=moe)
        gpt = build_gpt(one, parallel, transformer_config(one, parallel, "fp32"))
        gpt.eval()
        sharded = gpt.sharded_state_dict()
        apply_factories(sharded)  # SwiGLU's fc1 becomes its gate and up halves, views of the weight
        per_layer = []
        with torch.no_grad():
            for sh in nested_values(sharded):
                if not isinstance(sh, ShardedTensor):
                    continue
                key, layer, expert = locate(sh)
                if layer is None:
                    fill(sh, self.read(key, None))
                else:
                    per_layer.append((sh, key, expert))
        return gpt, per_layer

    def close(self) -> None:
        self._engine.__exit__(None, None, None)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        with torch.no_grad():
            return self.gpt.embedding(input_ids=tokens, position_ids=positions).transpose(0, 1)  # [b, s, h]

    def layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        gpt, per_layer = self.models[self._kind(index)]
        with torch.no_grad():
            for sh, key, expert in per_layer:
                fill(sh, self.read(key, index, expert))
            rotary = gpt.rotary_pos_emb(hidden.shape[1]) if hasattr(gpt, "rotary_pos_emb") else None
            out, _ = gpt.decoder.layers[0](hidden_states=hidden.transpose(0, 1).contiguous(),
                                           attention_mask=None, rotary_pos_emb=rotary)
        return out.transpose(0, 1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.gpt.shared_embedding_or_output_weight() if self.gpt.share_embeddings_and_output_weights else None
        with torch.no_grad():
            normed = self.gpt.decoder.final_layernorm(hidden.transpose(0, 1))
            logits, _ = self.gpt.output_layer(normed, weight=weight, runtime_gather_output=True)
        return logits.transpose(0, 1)[..., : self.vocab]


def compare_layers(reference, candidate, tokens: torch.Tensor, what: str) -> dict[str, float]:
    """Max |delta| after the embedding, each decoder layer and the head (logits), every one fed
    the reference's input. Raises ParityError naming the first point that deviates."""
    deltas = {}

    def check(name: str, ref: torch.Tensor, cand: torch.Tensor) -> None:
        if ref.shape != cand.shape:
            raise ParityError(f"{what}: {name} output shapes differ, {tuple(ref.shape)} vs {tuple(cand.shape)}")
        delta = (ref.float() - cand.float()).abs().max().item()
        deltas[name] = delta
        if not delta <= TOLERANCE * max(1.0, ref.abs().max().item()):
            raise ParityError(f"{what}: {name} differs by max |delta| {delta:.3e} on the same input (tolerance "
                              f"{TOLERANCE:.0e} of its scale); the conversion changed the model there, and its "
                              f"output was not kept")

    hidden = reference.embed(tokens)
    check("embedding", hidden, candidate.embed(tokens))
    for index in range(reference.num_layers):
        out = reference.layer(index, hidden)
        check(f"layer {index}", out, candidate.layer(index, hidden))
        hidden = out
    check("logits", reference.head(hidden), candidate.head(hidden))
    worst = max(deltas, key=deltas.get)
    print(f"parity: {what}: {len(deltas)} points layer by layer, worst {worst} {deltas[worst]:.2e}", flush=True)
    return deltas


def compare_tensors(reference, candidate, what: str) -> dict[str, float]:
    """Two Megatron-layout checkpoints (one engine runs both): every tensor of each layer compared,
    the vocabulary tables over the vocabulary's rows (padding may differ)."""
    deltas: dict[str, float] = {}
    vocab = reference.config.vocab_size
    for p in reference.params:
        layers = p.layer_indices(reference.config.num_layers) if p.per_layer else [None]
        for layer, expert in ((layer, expert) for layer in layers for expert in p.expert_indices()):
            a = reference.read(p.megatron, layer, expert).float()
            b = candidate.read(p.megatron, layer, expert).float()
            if isinstance(p.transform, PaddedVocab):
                a, b = a[:vocab], b[:vocab]
            if a.shape != b.shape:
                raise ParityError(f"{what}: {p.megatron} (layer {layer}) has shape {tuple(b.shape)}, the source "
                                  f"{tuple(a.shape)}")
            name = "embedding and head" if layer is None else f"layer {layer}"
            deltas[name] = max(deltas.get(name, 0.0), (a - b).abs().max().item())
    worst = max(deltas, key=deltas.get)
    print(f"parity: {what}: every tensor, layer by layer, worst {worst} {deltas[worst]:.2e}", flush=True)
    return deltas
