"""Converted checkpoints meet kiln's engine: an HF model converted to Megatron trains under TP1,
TP2 and PP2 from the same weights, and a checkpoint trained by `kiln pretrain` converts to HF and
to TensorRT-LLM with logits equal to megatron-core's own forward."""

from __future__ import annotations

import json

import pytest

from kiln.config import ConvertConfig, ExportConfig
from kiln.conversion.convert import convert
from kiln.data.tokenizer import vocab_size
from kiln.export.trtllm import export
from tests.conftest import launch, read_metrics, tiny_overrides
from tests.conversion.models import build

pytestmark = pytest.mark.slow  # launches processes (make test-fast skips it)


@pytest.fixture(scope="module")
def hf_tiny(demo_data, tmp_path_factory):
    """An HF Llama with the tiny recipe's shape and the demo tokenizer's vocabulary."""
    return build("llama", tmp_path_factory.mktemp("hf") / "tiny", vocab_size=vocab_size(demo_data / "tokenizer"),
                 hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)


def test_converted_checkpoint_trains_in_every_layout(hf_tiny, demo_data, tmp_path):
    meg = tmp_path / "meg"
    convert(ConvertConfig(source=str(hf_tiny), output=str(meg), to="megatron", tp=2))
    layouts = {"tp1": {"parallel.tp": "1"}, "tp2": {"parallel.tp": "2"},
               "pp2": {"parallel.tp": "1", "parallel.pp": "2"}}
    specs = [tiny_overrides(demo_data, tmp_path / name, train__steps="3", checkpoint__save_interval="0",
                            checkpoint__load_weights=str(meg / "checkpoints"),
                            **{k.replace(".", "__"): v for k, v in layout.items()})
             for name, layout in layouts.items()]
    launch(2, specs[1:])
    launch(1, specs[:1])
    first = {name: read_metrics(tmp_path / name)[1]["loss"] for name in layouts}
    assert max(first.values()) - min(first.values()) < 1e-5, first
    assert first["tp1"] < 7.0  # the converted weights, not a fresh init (ln 764 = 6.64 for random)


def test_pretrained_checkpoint_to_hf_and_trtllm(demo_data, tmp_path, capfd):
    run = tmp_path / "run"
    launch(2, [tiny_overrides(demo_data, run, train__steps="4", checkpoint__save_interval="2")])
    # an intermediate iteration converts too, not only the last
    summary = convert(ConvertConfig(source=str(run / "checkpoints" / "iter_0000002"), output=str(tmp_path / "hf"),
                                    to="hf"))
    assert summary["verified"] and summary["max_abs_logit_delta"] <= 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    exported = export(ExportConfig(source=str(run / "checkpoints"), output=str(tmp_path / "trt"), tp=2, pp=2,
                                   dtype="float32"))
    assert exported["verified"] and exported["max_abs_logit_delta"] <= 1e-4
    assert "parity: TensorRT-LLM export (tp=2, pp=2)" in capfd.readouterr().out
