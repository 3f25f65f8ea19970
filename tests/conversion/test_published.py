"""Published configs as the pinned transformers saves them (RoPE in `rope_parameters`): HF ->
Megatron (TP 1 and 2) -> HF and -> TensorRT-LLM, logits checked at every step. Before kiln read
configs through transformers' own classes, Llama 3.x and Qwen2.5 saved this way converted with
RoPE base 10000 (max |delta logit| 3.8 and 1.6), silently above the verification size."""

from __future__ import annotations

import json

import pytest

from kiln.config import ConvertConfig, ExportConfig
from kiln.conversion.convert import convert
from kiln.conversion.source import open_source
from kiln.errors import ConfigError
from kiln.export.trtllm import export
from tests.conversion.published import MISTRAL_V01, PUBLISHED, build

MATH_FIELDS = ("rope_parameters", "rope_theta", "rope_scaling", "rms_norm_eps", "layer_norm_epsilon", "head_dim",
               "num_key_value_heads", "num_attention_heads", "n_head", "hidden_size", "n_embd", "intermediate_size",
               "tie_word_embeddings", "max_position_embeddings", "n_positions", "sliding_window", "use_sliding_window",
               "attention_bias", "mlp_bias", "hidden_act", "activation_function")


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_round_trips_with_equal_logits(name, tmp_path):
    hf = build(name, tmp_path / "hf")
    saved = json.loads((hf / "config.json").read_text())
    if PUBLISHED[name][0] != "gpt2":
        assert "rope_parameters" in saved and "rope_theta" not in saved  # what transformers 5 writes
        rope = PUBLISHED[name][1]
        assert open_source(hf, 1, None).config.rotary_base == rope["rope_theta"]
    for tp in (1, 2):
        result = convert(ConvertConfig(source=str(hf), output=str(tmp_path / f"meg{tp}"), to="megatron", tp=tp,
                                       verify=True))
        assert result["max_abs_logit_delta"] <= 1e-4
    back = convert(ConvertConfig(source=str(tmp_path / "meg2"), output=str(tmp_path / "back"), to="hf", verify=True))
    assert back["max_abs_logit_delta"] <= 1e-4
    # what kiln writes is what transformers wrote, for every field that sets the math
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in MATH_FIELDS:
        assert written.get(key) == saved.get(key), (key, written.get(key), saved.get(key))
    if PUBLISHED[name][0] != "gpt2":
        trt = export(ExportConfig(source=str(hf), output=str(tmp_path / "trt"), tp=2, dtype="float32"))
        assert trt["max_abs_logit_delta"] <= 1e-4


def test_a_sliding_window_kiln_does_not_model_is_refused(tmp_path):
    hf = build("mistral-7b-v0.1", tmp_path / "hf", MISTRAL_V01)
    with pytest.raises(ConfigError, match="sliding_window=4096 is shorter than max_position_embeddings=32768"):
        convert(ConvertConfig(source=str(hf), output=str(tmp_path / "meg"), to="megatron"))
    assert not (tmp_path / "meg").exists()


def test_a_config_missing_a_shape_field_is_refused(tmp_path):
    hf = build("llama-3.2-1b", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    del config["intermediate_size"]
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="intermediate_size missing"):
        convert(ConvertConfig(source=str(hf), output=str(tmp_path / "meg"), to="megatron"))
