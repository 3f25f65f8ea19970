"""The checkpoint keys megatron-core's TransformerEngine layer spec gives a GPTModel, derived on CPU.

TransformerEngine cannot be installed without a GPU driver, so its modules cannot be built here.
What can be read without it is megatron-core 0.16.1's own spec: with TE absent its wrapper names
are distinct placeholder objects, and `get_gpt_layer_with_transformer_engine_spec` builds its
ModuleSpec tree once two import-time guards are satisfied (TESpecProvider is imported only when TE
imports; TE's version is None). Walking that tree says which module sits at each path; what each
TE module contributes to the sharded state dict is read from the sources (TE 2.9, mcore 0.16.1):

- TELayerNormColumnParallelLinear (te.pytorch.LayerNormLinear): layer_norm_weight, layer_norm_bias
  (LayerNorm only), weight, bias (if any), _extra_state (TransformerEngineBaseModule.get_extra_state);
- TERowParallelLinear / TEColumnParallelLinear (te.pytorch.Linear): weight, bias (if any), _extra_state;
- TEDotProductAttention: nothing (its sharded_state_dict returns {} unless the softmax is learnable);
- TENorm (te.pytorch.RMSNorm / LayerNorm, ops-based BasicOperations): weight, bias (LayerNorm),
  _extra_state. megatron-core's TransformerBlock uses it for the final norm when TE imports.
Layer keys are stacked under `decoder.layers.` (TransformerBlock.sharded_state_dict); GPTModel drops
the output layer's extra state.
"""

from __future__ import annotations


def te_layer_spec(**kwargs):
    """megatron-core's TE layer spec (`num_experts=...` for an MoE layer), built without TE."""
    import megatron.core.extensions.transformer_engine_spec_provider as provider
    import megatron.core.models.gpt.gpt_layer_specs as specs

    saved = provider.is_te_min_version, getattr(specs, "TESpecProvider", None)
    provider.is_te_min_version = lambda *args, **kwargs: True
    specs.TESpecProvider = provider.TESpecProvider
    try:
        return specs.get_gpt_layer_with_transformer_engine_spec(**kwargs)
    finally:
        provider.is_te_min_version, specs.TESpecProvider = saved


def te_checkpoint_keys(m) -> set[str]:
    """Sharded-state-dict keys of a GPTModel with model config `m` under the TE spec."""
    import megatron.core.extensions.transformer_engine as te
    from megatron.core.transformer.spec_utils import ModuleSpec

    def biased(path: str) -> bool:
        return m.add_bias_linear or (path.endswith("linear_qkv") and m.add_qkv_bias)

    def module_keys(cls, path: str) -> list[str]:
        norm = [f"{path}.layer_norm_weight"] + ([f"{path}.layer_norm_bias"] if m.normalization == "LayerNorm" else [])
        linear = [f"{path}.weight"] + ([f"{path}.bias"] if biased(path) else []) + [f"{path}._extra_state"]
        if cls is te.TELayerNormColumnParallelLinear:
            return norm + linear
        if cls in (te.TERowParallelLinear, te.TEColumnParallelLinear):
            return linear
        if cls is te.TENorm:
            return [f"{path}.weight", f"{path}._extra_state"] + ([f"{path}.bias"] if m.normalization == "LayerNorm"
                                                                 else [])
        return []  # TEDotProductAttention, identities, functions

    keys: list[str] = []

    def walk(spec, path: str) -> None:
        if isinstance(spec, ModuleSpec):
            keys.extend(module_keys(spec.module, path))
            for name in getattr(spec.submodules, "__dataclass_fields__", {}):
                walk(getattr(spec.submodules, name), f"{path}.{name}" if path else name)
        else:
            keys.extend(module_keys(spec, path))

    walk(te_layer_spec(), "")
    layer = [f"decoder.layers.{key}" for key in keys]
    final = module_keys(te.TENorm, "decoder.final_layernorm")
    embedding = ["embedding.word_embeddings.weight"]
    if m.position_embedding == "learned_absolute":
        embedding.append("embedding.position_embeddings.weight")
    output = [] if m.tie_embeddings else ["output_layer.weight"]
    return set(layer + final + embedding + output)
