"""TensorRT-LLM export of a mixture of experts (Mixtral): experts split over TP and EP ranks as
TensorRT-LLM's Mapping and MixtureOfExperts expect, config.json's moe and mapping fields, and the
CPU reference forward over only the rank shards matching transformers' MixtralForCausalLM."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from kiln.config import ConfigError, ExportConfig, ModelConfig, MoEConfig
from kiln.conversion.verify import hf_logits, sample_tokens
from kiln.export.moe import check_moe, moe_ranks
from kiln.export.reference import trtllm_logits
from kiln.export.trtllm import export, write_checkpoint

MIXTRAL = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
               rms_norm_eps=1e-5, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**MIXTRAL))
    with torch.no_grad():
        for name, p in model.named_parameters():
            # a wide router keeps the top-2 choice clear of float noise; the rest small but non-trivial
            p.normal_(0, 1.0 if name.endswith("gate.weight") else 0.1)
    directory = tmp_path_factory.mktemp("hf") / "mixtral"
    model.save_pretrained(directory)
    return directory


def _model_config() -> ModelConfig:
    c = MIXTRAL
    return ModelConfig(num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
                       ffn_hidden_size=c["intermediate_size"], num_attention_heads=c["num_attention_heads"],
                       num_query_groups=c["num_key_value_heads"], vocab_size=c["vocab_size"],
                       max_position_embeddings=c["max_position_embeddings"], normalization="RMSNorm",
                       norm_epsilon=c["rms_norm_eps"], activation="swiglu", position_embedding="rope",
                       rotary_base=1000000, tie_embeddings=False, add_bias_linear=False,
                       moe=MoEConfig(num_experts=c["num_local_experts"], topk=c["num_experts_per_tok"]))


def _write(mixtral, out, tp, ep, pp=1, dtype=torch.float32):
    """The export's writer fed straight from the HF file: one layer's HF-named tensors at a time."""
    out.mkdir()
    with safe_open(str(mixtral / "model.safetensors"), "pt") as f:
        names = list(f.keys())

        def layer(i, meta):
            prefix = f"model.layers.{i}."
            return {n[len(prefix):]: (torch.empty(f.get_slice(n).get_shape(), device="meta") if meta
                                      else f.get_tensor(n)) for n in names if n.startswith(prefix)}

        globals_ = {n: f.get_tensor(n) for n in names if not n.startswith("model.layers.")}
        write_checkpoint(out, _model_config(), "mixtral", layer, globals_, tp, pp, ep, dtype)
    return out


def _shapes(path):
    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.parametrize("tp, ep, pp", [(2, 1, 1), (2, 2, 1), (4, 2, 2)])
def test_rank_shards_reproduce_hf_logits(mixtral, tmp_path, tp, ep, pp):
    out = _write(mixtral, tmp_path / "trt", tp, ep, pp)
    tokens = sample_tokens(MIXTRAL["vocab_size"])
    delta = (trtllm_logits(out, tokens) - hf_logits(mixtral, tokens)).abs().max().item()
    assert delta <= 1e-4
    if ep > 1:  # the experts' place matters: ranks 0 and 1 trade files, their experts take the wrong ids
        shutil.copy(out / "rank0.safetensors", tmp_path / "r0")
        shutil.move(out / "rank1.safetensors", out / "rank0.safetensors")
        shutil.move(tmp_path / "r0", out / "rank1.safetensors")
        assert (trtllm_logits(out, tokens) - hf_logits(mixtral, tokens)).abs().max().item() > 1e-3  # 10x the tolerance


@pytest.mark.parametrize("tp, ep", [(2, 1), (2, 2)])
def test_config_names_and_shapes(mixtral, tmp_path, tp, ep):
    out = _write(mixtral, tmp_path / "trt", tp, ep, dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "MixtralForCausalLM" and config["hidden_act"] == "swiglu"
    assert config["intermediate_size"] == 32
    assert config["moe"] == {"num_experts": 4, "top_k": 2, "normalization_mode": 1}  # RENORMALIZE
    moe_tp = tp // ep
    assert config["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1,
                                 "moe_tp_size": moe_tp, "moe_ep_size": ep}
    with safe_open(str(mixtral / "model.safetensors"), "pt") as f:
        w1 = {e: f.get_tensor(f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight") for e in range(4)}
        w3 = {e: f.get_tensor(f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight") for e in range(4)}
        w2 = {e: f.get_tensor(f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight") for e in range(4)}
        router = f.get_tensor("model.layers.1.block_sparse_moe.gate.weight")
    for rank in range(tp):
        shapes = _shapes(out / f"rank{rank}.safetensors")
        p = "transformer.layers.1.mlp."
        assert shapes[p + "router.weight"] == ((4, 64), "F32")  # whole, float32, on every rank
        assert shapes[p + "fc.weight"] == ((4 // ep, 2 * 32 // moe_tp, 64), "BF16")
        assert shapes[p + "proj.weight"] == ((4 // ep, 64, 32 // moe_tp), "BF16")
        assert p + "gate.weight" not in shapes  # the dense MLP's name is gone
        with safe_open(str(out / f"rank{rank}.safetensors"), "pt") as f:
            fc, proj = f.get_tensor(p + "fc.weight"), f.get_tensor(p + "proj.weight")
            assert torch.equal(f.get_tensor(p + "router.weight"), router)
        moe_tp_rank, ep_rank = moe_ranks(rank, ep)
        assert (moe_tp_rank, ep_rank) == (rank // ep, rank % ep)  # TensorRT-LLM's Mapping
        inter = slice(moe_tp_rank * 32 // moe_tp, (moe_tp_rank + 1) * 32 // moe_tp)
        for i in range(4 // ep):
            e = ep_rank * (4 // ep) + i  # contiguous experts per EP rank (Mapping.ep_experts)
            up, gate = fc[i].chunk(2)  # [w3; w1]: linear half, then the activated half
            assert torch.equal(up, w3[e][inter].bfloat16()) and torch.equal(gate, w1[e][inter].bfloat16())
            assert torch.equal(proj[i], w2[e][:, inter].bfloat16())


def test_export_refusals(tmp_path):
    m = _model_config()
    with pytest.raises(ConfigError, match="--ep 2 does not divide --tp 3"):
        export(ExportConfig(source=str(tmp_path), output=str(tmp_path / "t"), tp=3, ep=2))
    with pytest.raises(ConfigError, match="--ep 3 does not divide the 4 experts"):
        check_moe(m, 3, 3, "mixtral")
    with pytest.raises(ConfigError, match="moe_tp 4 does not divide each expert's 30"):
        check_moe(ModelConfig(**{**m.__dict__, "moe": MoEConfig(num_experts=4, topk=2, ffn_hidden_size=30)}),
                  4, 1, "mixtral")
    with pytest.raises(ConfigError, match="--ep 2: the model has no experts"):
        check_moe(ModelConfig(**{**m.__dict__, "moe": None}), 2, 2, "llama")
    shared = MoEConfig(num_experts=4, topk=2, shared_expert_ffn_size=16, shared_expert_gate=True,
                       layer_pattern=[0, 1])
    with pytest.raises(ConfigError, match="a shared expert .*; dense layers between MoE layers"):
        check_moe(ModelConfig(**{**m.__dict__, "moe": shared}), 2, 1, "mixtral")
    with pytest.raises(ConfigError, match="model_type qwen2_moe: .* Mixtral only"):
        check_moe(m, 2, 1, "qwen2_moe")
    assert not (tmp_path / "t").exists()


def test_kiln_export_from_hf_mixtral(mixtral, tmp_path):
    """`kiln export` end to end: the source read through kiln's conversion view (Mixtral family)."""
    pytest.importorskip("kiln.conversion.moe", reason="the Mixtral conversion family has not landed")
    summary = export(ExportConfig(source=str(mixtral), output=str(tmp_path / "trt"), tp=2, ep=2, dtype="float32"))
    assert summary["verified"] and summary["max_abs_logit_delta"] <= 1e-4 and summary["ep"] == 2


def test_kiln_export_from_megatron_mixtral(mixtral, tmp_path):
    """A kiln Megatron MoE checkpoint (megatron-core's expert tensors) exported with experts over EP
    and TP at once (tp 4 = ep 2 x moe_tp 2): the shards match the megatron model and the HF original."""
    pytest.importorskip("kiln.conversion.moe", reason="the Mixtral conversion family has not landed")
    from kiln.conversion.convert import ConvertConfig, convert

    convert(ConvertConfig(source=str(mixtral), output=str(tmp_path / "meg"), to="megatron", dtype="float32",
                          verify=False))
    summary = export(ExportConfig(source=str(tmp_path / "meg"), output=str(tmp_path / "trt"), tp=4, ep=2,
                                  dtype="float32"))
    assert summary["verified"] and summary["max_abs_logit_delta"] <= 1e-4  # against megatron-core's forward
    tokens = sample_tokens(MIXTRAL["vocab_size"])
    assert (trtllm_logits(tmp_path / "trt", tokens) - hf_logits(mixtral, tokens)).abs().max().item() <= 1e-4
