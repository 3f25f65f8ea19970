"""LoRA on megatron-core's tensor-parallel linear layers and TransformerEngine's.

megatron-core 0.16.1 has no LoRA for its own layers (NeMo's lives outside megatron-core), so
kiln adds it here. `y = W x + (alpha / r) * B A x`, sharded like its base layer:

- ColumnParallelLinear (linear_qkv, linear_fc1): A is replicated, B is split on its output
  rows like W. A's input gradient must be the sum over TP ranks, so A's output passes
  through megatron's copy-to-TP region (identity forward, all-reduce backward).
- RowParallelLinear (linear_proj, linear_fc2): A is split on its input columns like W, its
  partial products are all-reduced (megatron's reduce-from-TP region), B is replicated.

TransformerEngine's TELayerNormColumnParallelLinear fuses the norm into the linear: its input is
the un-normalized hidden state, so it is told to also return the norm's output, and the adapter
reads that (Megatron-Bridge's and NeMo's LoRA do the same); TE's row- and column-parallel linears
split like megatron-core's. The adapter is a sibling module of its base layer (`linear_qkv_lora`
next to `linear_qkv`), called from a forward hook, so base weight names are unchanged and a
pretrained checkpoint loads as is. A is initialised on the host for the full shape and sliced, so TP ranks hold
exactly the single-process adapter; B starts at zero, so training starts from the base model.
"""

from __future__ import annotations

import math

import torch

from kiln.config import LoraConfig

ADAPTER_SUFFIX = "_lora"
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


class LoraAdapter(torch.nn.Module):
    def __init__(self, base, kind: str, cfg: LoraConfig, seed: int, glu: bool):
        super().__init__()
        from megatron.core import parallel_state as ps

        self.kind, self.glu = kind, glu
        self.scale = cfg.alpha / cfg.rank
        self.dropout = torch.nn.Dropout(cfg.dropout)
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        device, dtype = base.weight.device, base.weight.dtype
        inputs, outputs = _sizes(base, kind, tp)
        full_a = torch.empty(cfg.rank, inputs)
        torch.nn.init.kaiming_uniform_(full_a, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
        if kind == "column":
            a, b = full_a, torch.zeros(outputs, cfg.rank)
        else:
            a, b = full_a.chunk(tp, dim=1)[rank], torch.zeros(outputs, cfg.rank)
        self.lora_a = torch.nn.Parameter(a.to(device, dtype).contiguous())
        self.lora_b = torch.nn.Parameter(b.to(device, dtype))
        sharded, axis = (self.lora_b, 0) if kind == "column" else (self.lora_a, 1)
        for p in (self.lora_a, self.lora_b):  # megatron's TP attributes (grad norm, optimizer)
            p.tensor_model_parallel = p is sharded and tp > 1
            p.partition_dim = axis if p is sharded else -1
            p.partition_stride = 1
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        h = self.dropout(x) @ self.lora_a.t()
        if self.kind == "column":
            h = copy_to_tensor_model_parallel_region(h)
        else:
            h = reduce_from_tensor_model_parallel_region(h)
        return (h @ self.lora_b.t()) * self.scale

    def delta(self) -> torch.Tensor:
        """This rank's share of the merged weight update, shaped like the base weight shard."""
        return (self.lora_b @ self.lora_a) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        axis = {"lora_b": 0} if self.kind == "column" else {"lora_a": 1}
        sd = make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, axis,
                                                 sharded_offsets)
        if self.glu and self.kind == "column":  # B's rows follow fc1's [gate_r; up_r] TP layout
            key = f"{prefix}lora_b"
            sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets)
        return sd


def _sizes(base, kind: str, tp: int) -> tuple[int, int]:
    """(whole input features, output features: this rank's for a column layer, all for a row one).
    megatron-core's layers name them; TE's count per partition where TE splits (outputs of a
    column-parallel layer, inputs of a row-parallel one)."""
    if hasattr(base, "input_size"):
        return base.input_size, base.output_size_per_partition if kind == "column" else base.output_size
    if kind == "column":
        return base.in_features, base.out_features
    return base.in_features * tp, base.out_features


def _hook(adapter: LoraAdapter, after_norm: bool):
    """Add the adapter's output to its base layer's. A TE layer with its norm fused in (after_norm)
    was told to return the norm's output too: the adapter reads that, as it would read the
    separate norm's output in the local spec (as Megatron-Bridge's and NeMo's LoRA do)."""
    def add_adapter(_module, args, output):
        if after_norm:  # ((out, normed), bias), or (out, bias, normed) when TE returns the bias
            (out, x), bias = output if len(output) == 2 else ((output[0], output[2]), output[1])
        else:
            (out, bias), x = output, args[0]
        if adapter.merged:
            return out, bias
        return out + adapter(x).to(out.dtype), bias

    return add_adapter


def _kind(module) -> tuple[str, bool] | None:
    """("column" | "row", whether the layer fuses a norm before it) for megatron-core's parallel
    linears and their TransformerEngine counterparts (imported only where TE is), else None."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from kiln.training.layers import transformer_engine_available

    if isinstance(module, ColumnParallelLinear):
        return "column", False
    if isinstance(module, RowParallelLinear):
        return "row", False
    if transformer_engine_available():  # without TE these names are placeholders, not classes
        from megatron.core.extensions import transformer_engine as te

        if isinstance(module, te.TELayerNormColumnParallelLinear):
            return "column", True
        if isinstance(module, te.TEColumnParallelLinear):
            return "column", False
        if isinstance(module, te.TERowParallelLinear):
            return "row", False
    return None


def apply_lora(gpt, cfg: LoraConfig, seed: int) -> list[str]:
    """Freeze `gpt` and attach adapters to its target layers. Returns the adapted layer names."""
    for p in gpt.parameters():
        p.requires_grad = False
    adapted = []
    for name, module in list(gpt.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in cfg.target_modules or leaf not in TARGETS:
            continue
        found = _kind(module)
        if found is None:
            raise TypeError(f"lora.target_modules: {name} is a {type(module).__name__}, not a megatron-core "
                            f"or TransformerEngine parallel linear layer")
        kind, after_norm = found
        parent = gpt.get_submodule(name.rsplit(".", 1)[0])
        # the seed names the global layer, so every pipeline stage and TP rank agree
        adapter = LoraAdapter(module, kind, cfg, seed + 8 * _global_index(name, gpt) + TARGETS.index(leaf),
                              glu=leaf == "linear_fc1" and gpt.config.gated_linear_unit)
        parent.add_module(leaf + ADAPTER_SUFFIX, adapter)
        if after_norm:
            module.return_layernorm_output = True  # read by TE's LayerNormLinear at every forward
        module.register_forward_hook(_hook(adapter, after_norm))
        adapted.append(name)
    if not adapted:
        raise ValueError(f"lora.target_modules={cfg.target_modules} matched no layer; choose from "
                         f"linear_qkv, linear_proj, linear_fc1, linear_fc2")
    return adapted


def _global_index(name: str, gpt) -> int:
    """The layer's number in the whole model (layer numbers are global in megatron-core)."""
    parts = name.split(".")
    if "layers" in parts:
        local = int(parts[parts.index("layers") + 1])
        return gpt.decoder.layers[local].layer_number
    return 0


def adapters(chunks) -> dict[str, tuple[torch.nn.Module, LoraAdapter]]:
    """{adapter name with its global layer number: (base layer, adapter)} over this rank's chunks."""
    found = {}
    from kiln.training.model import gpt_of

    for chunk in chunks:
        module = gpt_of(chunk)
        for name, sub in module.named_modules():
            if isinstance(sub, LoraAdapter):
                base = module.get_submodule(name[: -len(ADAPTER_SUFFIX)])
                parts = name.split(".")
                if "layers" in parts:
                    i = parts.index("layers") + 1
                    parts[i] = str(_global_index(name, module) - 1)
                found[".".join(parts)] = (base, sub)
    return found


@torch.no_grad()
def merge(chunks) -> None:
    """Fold every adapter into its base weight (W += scale B A, shard by shard) and switch it off."""
    for base, adapter in adapters(chunks).values():
        base.weight.add_(adapter.delta().to(base.weight.dtype))
        adapter.merged = True
