"""TensorRT-LLM export: names, splits and config as TensorRT-LLM's checkpoint docs and Llama
converter define them, and a CPU forward over only the rank shards matching the HF model."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from kiln.config import ExportConfig
from kiln.export.trtllm import export
from tests.conversion.models import build


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    return build("llama", tmp_path_factory.mktemp("hf") / "gqa")  # 4 heads, 2 KV heads


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)])
def test_rank_shards_reproduce_hf_logits(gqa_model, tp, pp, tmp_path):
    summary = export(ExportConfig(source=str(gqa_model), output=str(tmp_path / "trt"), tp=tp, pp=pp,
                                  dtype="float32"))
    assert summary["verified"] and summary["max_abs_logit_delta"] <= 1e-4
    assert sorted(f for f in summary["files"] if f.startswith("rank")) == \
        sorted(f"rank{r}.safetensors" for r in range(tp * pp))


def test_names_splits_and_config(gqa_model, tmp_path):
    out = tmp_path / "trt"
    export(ExportConfig(source=str(gqa_model), output=str(out), tp=4, pp=2, dtype="bfloat16"))
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "LlamaForCausalLM" and config["dtype"] == "bfloat16"
    assert config["mapping"] == {"world_size": 8, "tp_size": 4, "pp_size": 2}
    assert config["num_key_value_heads"] == 2 and config["head_size"] == 16
    assert config["position_embedding_type"] == "rope_gpt_neox"
    assert config["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}

    def names(rank):
        with safe_open(str(out / f"rank{rank}.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    first, last = names(1), names(4 + 1)  # pp stage 0 and 1, tp rank 1
    assert first["transformer.vocab_embedding.weight"] == (1000, 64)
    assert "lm_head.weight" not in first and "transformer.ln_f.weight" not in first
    assert last["lm_head.weight"] == (250, 64) and "transformer.vocab_embedding.weight" not in last
    # layer indices restart on every stage; one of the 4 heads and one (repeated) KV head per rank
    assert first["transformer.layers.0.attention.qkv.weight"] == ((1 + 1 + 1) * 16, 64)
    assert last["transformer.layers.0.attention.qkv.weight"] == ((1 + 1 + 1) * 16, 64)
    assert first["transformer.layers.0.attention.dense.weight"] == (64, 16)
    assert first["transformer.layers.0.mlp.fc.weight"] == (40, 64)
    assert first["transformer.layers.0.mlp.gate.weight"] == (40, 64)
    assert first["transformer.layers.0.mlp.proj.weight"] == (64, 40)
    assert "transformer.layers.1.attention.qkv.weight" not in first  # 2 layers over 2 stages
    script = (out / "build.sh").read_text()
    assert "trtllm-build --checkpoint_dir . --output_dir engines" in script and "--workers 8" in script


def test_verification_needs_fp32(gqa_model, tmp_path):
    from kiln.config import ConfigError

    with pytest.raises(ConfigError, match="--verify compares logits within 1e-4, which needs --dtype float32"):
        export(ExportConfig(source=str(gqa_model), output=str(tmp_path / "t"), dtype="bfloat16", verify=True))
    assert not (tmp_path / "t").exists()


def test_export_to_hf_for_llm_api_and_vllm(gqa_model, tmp_path):
    summary = export(ExportConfig(source=str(gqa_model), output=str(tmp_path / "hf"), to="hf", dtype="float32"))
    assert summary["verified"]
    assert (tmp_path / "hf" / "config.json").exists()
