"""Every MoE / expert-parallel rule fails before anything starts, naming the field and the fix,
so megatron-core never gets to assert first."""

from __future__ import annotations

import pytest

from kiln import overrides
from kiln.errors import ConfigError
from kiln.recipes.pretrain import tiny
from kiln.training.validate import validate
from kiln.validation import Check

MOE = {"model.moe.num_experts": 4, "model.moe.topk": 2, "parallel.tp": 1}


def check(world: int, **fields):
    cfg = tiny()
    cfg.model.vocab_size = 1000
    cfg.parallel.world_size = None
    overrides.apply(cfg, {k.replace("__", "."): v for k, v in fields.items()})
    validate(cfg, Check(world_size=world, files="skip"))


def moe(**fields) -> dict:
    return {**{k.replace(".", "__"): v for k, v in MOE.items()}, **fields}


@pytest.mark.parametrize("world, fields", [
    (2, moe(parallel__ep=2)),
    (4, moe(parallel__ep=4)),
    (4, moe(parallel__ep=2, parallel__tp=2, parallel__sequence_parallel=True)),
    (4, moe(parallel__ep=2, parallel__tp=2, parallel__etp=1, parallel__sequence_parallel=True)),
    (2, moe(model__moe__layer_pattern=[1, 0, 1, 0], parallel__ep=2, parallel__moe_dispatcher="allgather")),
    (1, moe(model__moe__topk=1, model__moe__normalize_topk=False)),
])
def test_valid_moe_layouts(world, fields):
    check(world, **fields)


@pytest.mark.parametrize("world, fields, message", [
    (2, {"parallel__tp": 1, "parallel__ep": 2},
     "parallel.ep=2 split experts, but model.moe is unset (a dense model): set model.moe (e.g. "
     "model.moe.num_experts=8), or parallel.ep=1 and parallel.etp=null"),
    (3, moe(model__moe__num_experts=4, parallel__ep=3),
     "model.moe.num_experts=4 is not divisible by parallel.ep=3: each EP rank holds the same number of "
     "experts; pick parallel.ep among 1, 2, 4"),
    (2, moe(parallel__ep=4),
     "world size 2 is not divisible by parallel.pp x parallel.ep x expert TP = 1 x 4 x 1 = 4: the expert "
     "layers split the ranks of each pipeline stage into EP x expert-TP x expert-DP; launch a multiple of 4 "
     "processes, or lower parallel.ep / parallel.etp"),
    (2, moe(parallel__etp=2),
     "parallel.etp=2: expert TP must be 1 or parallel.tp=1"),
    (1, moe(model__moe__topk=5),
     "model.moe.topk=5 exceeds model.moe.num_experts=4: a token cannot go to more experts than there are; "
     "lower model.moe.topk"),
    (1, moe(model__moe__layer_pattern=[1, 0]),
     "model.moe.layer_pattern=[1, 0] must hold one 0 (dense) or 1 (MoE) per layer, model.num_layers=4 "
     "entries: fix the list, or set it to null for experts in every layer"),
    (1, moe(model__moe__layer_pattern=[1, 2, 0, 1]),
     "model.moe.layer_pattern=[1, 2, 0, 1] must hold one 0 (dense) or 1 (MoE) per layer"),
    (1, moe(model__moe__layer_pattern=[0, 0, 0, 0]),
     "model.moe.layer_pattern has no MoE layer (all 0): set at least one 1, or unset model.moe"),
    (2, moe(parallel__tp=2, parallel__sequence_parallel=True, model__moe__ffn_hidden_size=63),
     "the expert hidden size 63 (model.moe.ffn_hidden_size, else the model's) is not divisible by the "
     "expert TP size 2 (parallel.etp, else parallel.tp): change one of them"),
    (1, moe(model__moe__shared_expert_gate=True),
     "model.moe.shared_expert_gate=true gates a shared expert, but model.moe.shared_expert_ffn_size is "
     "unset: set it, or the gate to false"),
    (2, moe(parallel__tp=2, parallel__sequence_parallel=True, model__moe__shared_expert_ffn_size=33),
     "model.moe.shared_expert_ffn_size=33 is not divisible by parallel.tp=2"),
    (1, moe(model__moe__pad_to_capacity=True),
     "model.moe.pad_to_capacity=true pads each expert's tokens to its capacity, but "
     "model.moe.capacity_factor is unset: set it (e.g. 1.25), or pad_to_capacity=false"),
    (1, moe(model__moe__topk=1),
     "model.moe.topk=1 with normalize_topk=true: a softmax over one chosen expert is always 1 and the "
     "router would get no gradient; set model.moe.normalize_topk=false"),
    (1, moe(model__moe__score_function="sigmoid", model__moe__normalize_topk=False),
     "model.moe.score_function=sigmoid with normalize_topk=false: megatron-core always renormalises "
     "sigmoid top-k weights to sum to 1; set model.moe.normalize_topk=true"),
    (2, moe(parallel__tp=2, parallel__sequence_parallel=True, model__add_bias_linear=True),
     "model.add_bias_linear=true with experts split over expert TP 2: megatron-core supports expert "
     "biases only at expert TP 1; set parallel.etp=1, or model.add_bias_linear=false"),
    (2, moe(parallel__tp=2),
     "model.moe with parallel.tp=2 needs parallel.sequence_parallel=true"),
])
def test_moe_rule_names_field_and_fix(world, fields, message):
    with pytest.raises(ConfigError) as err:
        check(world, **fields)
    assert message in str(err.value)


def test_megatron_core_accepts_every_valid_layout_config():
    """The TransformerConfig kiln builds for a valid MoE config passes megatron-core's own checks."""
    from kiln.training.model import transformer_config

    cfg = tiny()
    overrides.apply(cfg, {**MOE, "model.moe.shared_expert_ffn_size": 64, "model.moe.shared_expert_gate": True,
                          "model.moe.capacity_factor": 1.5, "model.moe.pad_to_capacity": True,
                          "model.moe.z_loss_coeff": 1e-3, "model.moe.layer_pattern": [1, 0, 1, 1],
                          "parallel.ep": 2})
    tc = transformer_config(cfg.model, cfg.parallel, "fp32")
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 384)
    assert tc.moe_layer_freq == [1, 0, 1, 1] and tc.expert_model_parallel_size == 2
    assert tc.moe_router_pre_softmax is False and tc.moe_grouped_gemm is False


def test_memory_estimate_splits_experts_over_ep():
    """Mixtral 8x7B's published sizes (46.7B, 12.9B active); each EP rank holds its share of the experts,
    and the distributed optimizer shards expert state over expert DP, dense state over DP."""
    from kiln.config import MoEConfig
    from kiln.recipes.models import llama
    from kiln.training import memory

    cfg = tiny()
    cfg.model = llama(32, 4096, 32, 8, 14336, vocab_size=32000, max_position_embeddings=32768,
                      make_vocab_size_divisible_by=128, moe=MoEConfig(num_experts=8, topk=2))
    overrides.apply(cfg, {"parallel.tp": 1, "parallel.pp": 4, "parallel.ep": 8, "optimizer.distributed": True,
                          "train.seq_length": 4096, "train.micro_batch_size": 1, "train.global_batch_size": 512})
    e8 = memory.estimate(cfg, 64, "bf16", flash_attention=True)
    assert round(e8["parameters_total"] / 1e9, 1) == 46.7 and round(e8["parameters_active"] / 1e9, 1) == 12.9
    expert = 3 * 4096 * 14336  # one SwiGLU expert
    assert e8["expert_parameters_per_rank"] == 8 * 8 * expert // 8  # 8 layers per stage, 8 experts over EP=8
    cfg.parallel.ep = 4
    e4 = memory.estimate(cfg, 64, "bf16", flash_attention=True)
    assert e4["expert_parameters_per_rank"] == 2 * e8["expert_parameters_per_rank"]
    assert e4["weights_gib"] > e8["weights_gib"] and e4["gradients_gib"] > e8["gradients_gib"]
    # half the EP doubles expert DP: the distributed optimizer's expert state per rank stays the same
    assert e4["optimizer_gib"] == pytest.approx(e8["optimizer_gib"])
