"""kiln and NeMo 2.7.3 read each other's NeMo 2 checkpoints, checked by NeMo's own code on CPU.

NeMo runs in its own venv (`make nemo-env`, built once and reused) through
tests/conversion/nemo_side.py: its HF importer, its HF exporter and its `load_context`. Every
tensor is compared, not a sample: a tensor either side skipped, a norm left at its init or a
padded row would differ from the source.
"""

from __future__ import annotations

import glob
import json
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from kiln.config import ConvertConfig
from kiln.conversion.convert import convert
from kiln.conversion.source import open_source
from kiln.errors import NemoFormatError
from tests.conftest import ROOT
from tests.conversion.models import build

pytestmark = pytest.mark.slow
NEMO_PYTHON = ROOT / ".venv-nemo" / "bin" / "python"
FAMILIES = ("llama", "qwen2", "mistral")  # Llama 3.1 RoPE scaling + GQA; Qwen2 q/k/v bias, tied; Mistral
# the config fields that set the math, as NeMo rebuilds them from io.json
MATH_FIELDS = ("config_class", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_channels", "vocab_size", "normalization", "layernorm_epsilon",
               "gated_linear_unit", "activation_func", "position_embedding_type", "rotary_base", "rotary_percent",
               "share_embeddings_and_output_weights", "add_bias_linear", "add_qkv_bias", "scale_factor",
               "low_freq_factor", "high_freq_factor", "old_context_len", "window_size", "params_dtype")


def nemo(*commands: list[str]) -> None:
    out = subprocess.run([str(NEMO_PYTHON), str(ROOT / "tests/conversion/nemo_side.py"),
                          *(json.dumps(c) for c in commands)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """NeMo's environment, HF models saved by NeMo's transformers, and what NeMo's importer made of them."""
    started = time.time()
    make = subprocess.run(["make", "nemo-env"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert make.returncode == 0, make.stdout[-2000:] + make.stderr[-4000:]
    print(f"\nmake nemo-env: {time.time() - started:.0f} s {make.stdout.strip()}")
    root = tmp_path_factory.mktemp("nemo")
    hf = {f: root / f"hf_{f}" for f in FAMILIES}
    windowed = root / "hf_mistral_window"
    imported = {f: root / f"nemo_{f}" for f in ("llama", "qwen2")}
    nemo(*(["tiny-hf", f, str(hf[f])] for f in FAMILIES),
         ["tiny-hf", "mistral", str(windowed), json.dumps({"sliding_window": 4096})],
         *(["import", str(hf[f]), str(imported[f])] for f in imported),
         ["import", str(windowed), str(root / "nemo_mistral_window")])
    return root, hf, imported


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in glob.glob(f"{directory}/*.safetensors"):
        out.update(load_file(path))
    return out


def assert_same_tensors(expected_dir, actual_dir) -> None:
    """Bitwise equal; a tied source may come back untied (NeMo's Qwen2 importer and exporter always
    untie) with an lm_head equal to the embedding."""
    expected, actual = tensors(expected_dir), tensors(actual_dir)
    if "lm_head.weight" not in expected and "lm_head.weight" in actual:
        assert torch.equal(actual.pop("lm_head.weight"), expected["model.embed_tokens.weight"])
    assert expected.keys() == actual.keys(), sorted(expected.keys() ^ actual.keys())
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def layout(weights) -> dict:
    """Every key of a NeMo weights/ directory with its global shape, dtype and chunks."""
    out = {}
    for key, meta in FileSystemReader(str(weights)).read_metadata().state_dict_metadata.items():
        chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in getattr(meta, "chunks", []))
        out[key] = (tuple(getattr(meta, "size", ())), str(getattr(getattr(meta, "properties", None), "dtype", "")),
                    chunks)
    return out


def test_kiln_reads_what_nemos_importer_wrote(sources, tmp_path):
    root, hf, imported = sources
    for family, checkpoint in imported.items():
        convert(ConvertConfig(source=str(checkpoint), output=str(tmp_path / family), to="hf"))
        assert_same_tensors(hf[family], tmp_path / family)
        source_config = json.loads((hf[family] / "config.json").read_text())
        written = json.loads((tmp_path / family / "config.json").read_text())
        for key in ("rope_theta", "rms_norm_eps", "num_key_value_heads", "vocab_size"):
            assert written.get(key, written.get("rope_parameters", {}).get(key)) == \
                source_config.get(key, source_config.get("rope_parameters", {}).get(key)), (family, key)
        # to Megatron: the same tensors as from the HF source, whose conversion trains under TP1/TP2/PP2
        # (tests/conversion/test_engine.py)
        convert(ConvertConfig(source=str(checkpoint), output=str(tmp_path / f"meg_{family}"), to="megatron"))
        convert(ConvertConfig(source=str(hf[family]), output=str(tmp_path / f"meg_hf_{family}"), to="megatron"))
        via_nemo, via_hf = open_source(tmp_path / f"meg_{family}", 1, None), open_source(
            tmp_path / f"meg_hf_{family}", 1, None)
        vocab = via_hf.config.vocab_size  # padding rows may differ: NeMo's divisor leaves none
        for p in via_hf.params:
            for layer in (range(via_hf.config.num_layers) if p.per_layer else [None]):
                a, b = via_nemo.read(p.megatron, layer), via_hf.read(p.megatron, layer)
                if layer is None and p.megatron != "decoder.final_layernorm.weight":
                    a, b = a[:vocab], b[:vocab]
                assert torch.equal(a, b), (family, p.megatron, layer)
    # NeMo imports Mistral v0.1's sliding window; kiln's engine does not model it and says so
    with pytest.raises(NemoFormatError, match="window_size"):
        convert(ConvertConfig(source=str(root / "nemo_mistral_window"), output=str(tmp_path / "window"), to="hf"))
    assert not (tmp_path / "window").exists()


def test_nemo_loads_and_exports_what_kiln_writes(sources, tmp_path):
    root, hf, imported = sources
    for family in FAMILIES:
        convert(ConvertConfig(source=str(hf[family]), output=str(tmp_path / f"kiln_{family}"), to="nemo2"))
    # GPT-2: NeMo 2.7.3 has no GPT-2 importer or exporter; its load_context must still rebuild the model
    convert(ConvertConfig(source=str(build("gpt2", tmp_path / "hf_gpt2")), output=str(tmp_path / "kiln_gpt2"),
                          to="nemo2"))
    nemo(*(["export", str(tmp_path / f"kiln_{f}"), str(tmp_path / f"back_{f}")] for f in FAMILIES),
         *(["context", str(tmp_path / f"kiln_{f}"), str(tmp_path / f"kiln_{f}.json")] for f in (*FAMILIES, "gpt2")),
         *(["context", str(imported[f]), str(tmp_path / f"nemo_{f}.json")] for f in imported))
    gpt2 = json.loads((tmp_path / "kiln_gpt2.json").read_text())
    assert (gpt2["config_class"], gpt2["position_embedding_type"], gpt2["normalization"], gpt2["activation_func"],
            gpt2["gated_linear_unit"], gpt2["add_bias_linear"]) == (
        "GPTConfig", "learned_absolute", "LayerNorm", "openai_gelu", False, True)
    for family in FAMILIES:
        assert_same_tensors(hf[family], tmp_path / f"back_{family}")  # NeMo's exporter gives the source back
    for family in imported:
        kiln_context = json.loads((tmp_path / f"kiln_{family}.json").read_text())
        nemo_context = json.loads((tmp_path / f"nemo_{family}.json").read_text())
        assert {f: kiln_context.get(f) for f in MATH_FIELDS} == {f: nemo_context.get(f) for f in MATH_FIELDS}
        # weights/ as NeMo's importer lays them out: keys, shapes, dtypes, chunks (SwiGLU's halves, no padding);
        # kiln adds TE's final-norm _extra_state, which NeMo's CPU stand-in norm lacks
        ours, theirs = layout(tmp_path / f"kiln_{family}" / "weights"), layout(imported[family] / "weights")
        extra = set(ours) - set(theirs)
        assert extra == {"module.decoder.final_layernorm._extra_state/shard_0_1"}, extra
        assert {k: ours[k] for k in theirs} == theirs
