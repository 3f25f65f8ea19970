"""Builds megatron-core GPTModel chunks, wrapped in megatron-core DDP, from a ModelConfig."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kiln.config import ModelConfig, ParallelConfig
from kiln.training.layers import SequenceParallelTorchNorm, seeded_experts, transformer_engine_available

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),  # GPT-2's gelu_new
    "swiglu": F.silu,  # gated: megatron-core multiplies silu(gate) by up
}


def params_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: str):
    """The megatron-core TransformerConfig for this model, layout and precision."""
    from megatron.core.transformer import TransformerConfig

    dtype = params_dtype(precision)
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        # shape
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.heads_kv,
        kv_channels=model.head_dim,
        # family
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=_ACTIVATIONS[model.activation],
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,  # Qwen3: RMSNorm on each head's q and k before RoPE
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        # parallelism
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=parallel.sequence_parallel,
        # interleaving sends activations and gradients between the same two ranks at once;
        # batched p2p pairs them by call order and can swap them (seen with gloo at PP=2),
        # so interleaved runs use megatron's ordered p2p, overlapped, as Megatron-LM does
        batch_p2p_comm=parallel.vpp is None,
        overlap_p2p_comm=parallel.vpp is not None,
        # precision
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # the loss is a sum over tokens; megatron-core divides by the global token count, so
        # masked (SFT) and unmasked tokens weigh the same under any DP x microbatch split
        calculate_per_token_loss=True,
        # CPU: initialise full weights on the host and slice them, so TP ranks hold exactly
        # the single-process weights; fused kernels exist only on GPU
        use_cpu_initialization=on_cpu,
        masked_softmax_fusion=not on_cpu,
        bias_activation_fusion=not on_cpu and model.activation != "gelu_tanh",
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **moe_fields(model, parallel),
    )


def moe_fields(model: ModelConfig, parallel: ParallelConfig) -> dict:
    """megatron-core's MoE settings for `model.moe` (none for a dense model)."""
    moe = model.moe
    if moe is None:
        return {}
    grouped = torch.cuda.is_available() and transformer_engine_available()
    # Under per-token loss (calculate_per_token_loss) megatron-core scales each rank's aux and
    # z-loss by the tokens that rank routes; with TP (sequence parallel) that is 1/TP of the tokens
    # the LM loss is summed over on the rank, so their gradients come out TP times too small
    # (measured: EP=2 x TP=2 left the single-process curve at step 1 unless compensated). The
    # coefficients are raised by TP; logged values divide the coefficient out again.
    scale = parallel.tp
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.topk,
        moe_ffn_hidden_size=model.expert_ffn_size,
        moe_router_score_function=moe.score_function,
        # pre-softmax: softmax over every expert, then the top-k as they are (sum < 1); without
        # it the softmax runs over the chosen k only, so their weights sum to 1
        moe_router_pre_softmax=not moe.normalize_topk,
        moe_router_load_balancing_type=moe.load_balancing,
        moe_aux_loss_coeff=moe.aux_loss_coeff * scale if moe.load_balancing != "none" else 0.0,
        moe_z_loss_coeff=moe.z_loss_coeff * scale if moe.z_loss_coeff is not None else None,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy=moe.drop_policy,
        moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_size,
        moe_shared_expert_gate=moe.shared_expert_gate,
        moe_layer_freq=list(moe.layer_pattern) if moe.layer_pattern is not None else 1,
        moe_token_dispatcher_type=parallel.moe_dispatcher,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp or parallel.tp,
        # TransformerEngine's grouped GEMM runs all local experts in one kernel (GPU only);
        # the local spec runs them one after another (SequentialMLP)
        moe_grouped_gemm=grouped,
    )


def layer_spec(model: ModelConfig, tconfig, vp_stage: int | None):
    """TransformerEngine layers when importable (GPU), megatron-core's local layers otherwise."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if torch.cuda.is_available() and transformer_engine_available():
        if model.moe is not None:  # per-layer dense/MoE pattern, experts on TE's grouped GEMM
            return get_gpt_decoder_block_spec(tconfig, use_transformer_engine=True,
                                              normalization=model.normalization, vp_stage=vp_stage)
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    dense = _local_layer(model, None)
    moe = _local_layer(model, model.moe.num_experts) if model.moe is not None else None
    layers = [moe if moe is not None and model.moe.is_moe_layer(i) else dense for i in range(model.num_layers)]
    offset = get_transformer_layer_offset(tconfig, vp_stage=vp_stage)
    count = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=layers[offset:offset + count], layer_norm=SequenceParallelTorchNorm
        ),
    )


def _local_layer(model: ModelConfig, num_experts: int | None):
    """megatron-core's local layer spec with kiln's norm, dense or MoE."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    layer = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                     normalization=model.normalization, qk_layernorm=model.qk_layernorm)
    # megatron-core's torch-norm wrapper refuses sequence parallelism and does not tag its
    # weights for the TP all-reduce of their gradients; kiln's norm does both (the q/k norms
    # too: megatron-core's wrapper would refuse them under sequence parallelism; their partial
    # gradients, one per TP rank's heads, megatron-core all-reduces by name)
    layer.submodules.input_layernorm = SequenceParallelTorchNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    if model.qk_layernorm:
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = SequenceParallelTorchNorm
    if num_experts is not None:
        layer.submodules.mlp.submodules.experts.module = seeded_experts()
        # megatron-core's local spec saves an MoE layer's pre-MLP norm under the fused dense name
        # (mlp.linear_fc1.layer_norm_weight), its TE spec as pre_mlp_layernorm.weight (no fc1 to fuse
        # into): keep TE's name, so MoE checkpoints move between CPU and GPU, and to Megatron-LM's
        layer.submodules.sharded_state_dict_keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    return layer


def build_gpt(model: ModelConfig, parallel: ParallelConfig, tconfig, vp_stage: int | None = None):
    """One GPTModel chunk for this rank's pipeline stage (and virtual stage)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    rope = model.position_embedding == "rope"
    gpt = GPTModel(
        config=tconfig,
        transformer_layer_spec=layer_spec(model, tconfig, vp_stage),
        vocab_size=model.padded_vocab_size(parallel.tp),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=model.position_embedding,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
    )
    if rope and model.rope_scaling is not None:
        _scale_rope(gpt, model)
    return gpt


def gpt_of(chunk):
    """The GPTModel inside a chunk, whatever wraps it (DDP, Float16Module)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def attend_within_mask(gpt) -> None:
    """Make the local attention honour the attention mask it is given (a packed batch's block-
    diagonal causal mask). megatron-core builds it with the causal mask type, whose fused softmax
    kernel (GPU, masked_softmax_fusion) applies its own triangle and ignores the mask, so packed
    examples would attend to each other; the `arbitrary` type makes both the fused kernel and the
    torch path apply the given mask, which must then hold the causal part too (it does)."""
    from megatron.core.transformer.enums import AttnMaskType

    for layer in gpt.decoder.layers:
        softmax = getattr(layer.self_attention.core_attention, "scale_mask_softmax", None)
        if softmax is not None:  # the local spec's DotProductAttention (TE's takes THD instead)
            softmax.attn_mask_type = AttnMaskType.arbitrary


def _scale_rope(gpt, model: ModelConfig) -> None:
    """Llama 3.1 RoPE scaling with all four of its parameters (GPTModel exposes only `factor`)."""
    rope = gpt.rotary_pos_emb
    s = model.rope_scaling
    dim = int(model.head_dim * model.rotary_percent)
    base = 1.0 / model.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rope.inv_freq = rope._apply_scaling(
        base.to(rope.inv_freq.device),
        factor=s.factor,
        low_freq_factor=s.low_freq_factor,
        high_freq_factor=s.high_freq_factor,
        original_max_position_embeddings=s.original_max_position_embeddings,
    )


def build_model(model: ModelConfig, parallel: ParallelConfig, precision: str, device: torch.device,
                use_distributed_optimizer: bool, transform=None):
    """This rank's model chunks (one, or vpp with interleaving), each wrapped in megatron-core DDP.
    In bf16/fp16 each chunk is first wrapped in megatron-core's Float16Module, as Megatron-LM
    does: it casts every weight (GPT-2's learned position embedding too, so the first layer sees
    a bf16 hidden state, which TransformerEngine's fused layers require) and returns fp32 logits."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import set_defaults_if_not_set_tensor_model_parallel_attributes
    from megatron.core.transformer.module import Float16Module

    tconfig = transformer_config(model, parallel, precision)
    stages = range(parallel.vpp) if parallel.vpp else [None]
    chunks = [build_gpt(model, parallel, tconfig, vp_stage=s) for s in stages]
    for i, chunk in enumerate(chunks):
        if transform is not None:
            transform(chunk)
        for p in chunk.parameters():
            set_defaults_if_not_set_tensor_model_parallel_attributes(p)
        chunk.to(device)
        if precision in ("bf16", "fp16"):
            chunks[i] = Float16Module(tconfig, chunk)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,  # kiln checks the loss and the grad norm itself
    )
    wrapped = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    return wrapped, tconfig
