"""HF -> Megatron -> HF for every family and option: logits within 1e-4 at each step (checked by
`kiln convert` itself) and every tensor back bit for bit; both .nemo layouts preserve every tensor
and config field."""

from __future__ import annotations

import glob

import pytest
import torch
from safetensors.torch import load_file

from kiln.config import ConvertConfig
from kiln.conversion import dcp
from kiln.conversion.convert import convert
from kiln.conversion.source import open_source
from tests.conversion.models import VARIANTS, build


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in glob.glob(f"{directory}/*.safetensors"):
        out.update(load_file(path))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: build(kind, root / name, **overrides) for name, (kind, overrides) in VARIANTS.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_megatron_hf_is_bitwise_and_logit_exact(models, variant, tmp_path):
    source = models[variant]
    to_megatron = convert(ConvertConfig(source=str(source), output=str(tmp_path / "meg"), to="megatron", tp=2))
    back = convert(ConvertConfig(source=str(tmp_path / "meg"), output=str(tmp_path / "hf"), to="hf"))
    assert to_megatron["verified"] and back["verified"]
    assert to_megatron["max_abs_logit_delta"] <= 1e-4 and back["max_abs_logit_delta"] <= 1e-4
    for summary in (to_megatron, back):  # transformers' layers vs megatron-core's, one at a time
        assert list(summary["layer_max_abs_delta"]) == ["embedding", "layer 0", "layer 1", "logits"]
        assert max(summary["layer_max_abs_delta"].values()) <= 1e-5
    a, b = tensors(source), tensors(tmp_path / "hf")
    if variant == "llama_tied":
        a.pop("lm_head.weight", None)  # a tied head is the embedding, written once
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert (tmp_path / "hf" / "generation_config.json").exists()


def test_megatron_vocab_is_padded_for_the_target_tp(models, tmp_path):
    convert(ConvertConfig(source=str(models["llama_gqa"]), output=str(tmp_path / "m"), to="megatron", tp=8))
    model = open_source(tmp_path / "m", 1, None)
    assert model.shape("embedding.word_embeddings.weight")[0] == 1024  # 1000 -> multiple of 128 x 8
    rows = model.read("embedding.word_embeddings.weight", None)
    assert torch.count_nonzero(rows[1000:]) == 0


@pytest.mark.parametrize("layout", ["nemo2", "nemo"])
def test_nemo_layouts_preserve_every_tensor_and_field(models, layout, tmp_path):
    source = models["llama_gqa"]
    out = tmp_path / ("model.nemo" if layout == "nemo" else "nemo2")
    convert(ConvertConfig(source=str(source), output=str(out), to=layout))
    original, written = open_source(source, 1, None), open_source(out, 1, None)
    vocab = original.config.vocab_size
    if layout == "nemo2":  # NeMo's importer never pads: the tables hold the vocabulary, the divisor divides it
        assert written.shape("embedding.word_embeddings.weight")[0] == vocab
        assert vocab % written.config.make_vocab_size_divisible_by == 0
        written.config.make_vocab_size_divisible_by = original.config.make_vocab_size_divisible_by
    assert written.config == original.config
    assert written.model_type == original.model_type
    for p in original.params:
        layers = range(original.config.num_layers) if p.per_layer else [None]
        for layer in layers:
            a, b = original.read(p.megatron, layer), written.read(p.megatron, layer)
            if layout == "nemo2" and p.megatron.endswith(("word_embeddings.weight", "output_layer.weight")):
                a = a[:vocab]
            assert torch.equal(a, b), (p.megatron, layer)
    if layout == "nemo":
        import tarfile

        names = tarfile.open(out).getnames()
        assert "./model_config.yaml" in names and any(n.startswith("./model_weights/") for n in names)
        assert not (tmp_path / "model.nemo.staging").exists()
    else:
        assert (out / "context" / "model.yaml").exists() and (out / "weights" / "metadata.json").exists()
        assert any(k.startswith("module.decoder.layers.") for k in dcp.Reader(out / "weights").tensor_keys())


@pytest.mark.parametrize("variant", ["llama_gqa", "llama_tied", "qwen2_qkv_bias", "gpt2"])
def test_converted_checkpoint_has_every_key_the_transformer_engine_spec_loads(models, variant, tmp_path):
    """On GPU kiln builds megatron-core's TE layer spec and loads strictly; the keys that spec
    names are derived from megatron-core's own spec tree on CPU (tests/conversion/te_spec.py)."""
    from torch.distributed.checkpoint import FileSystemReader

    from kiln.artifact import resolve_checkpoint
    from tests.conversion.te_spec import te_checkpoint_keys

    convert(ConvertConfig(source=str(models[variant]), output=str(tmp_path / "meg"), to="megatron", verify=False))
    path = resolve_checkpoint(tmp_path / "meg" / "checkpoints")
    saved = {key.split("/shard_")[0] for key in FileSystemReader(str(path)).read_metadata().state_dict_metadata}
    model = open_source(tmp_path / "meg", 1, None).config
    expected = te_checkpoint_keys(model)
    assert "decoder.final_layernorm._extra_state" in expected  # TE's norm carries FP8 state
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in expected  # the fused norm
    assert expected <= saved, sorted(expected - saved)


def test_layer_by_layer_names_the_layer_a_wrong_rope_base_breaks(tmp_path):
    """The check that runs at every size: a RoPE base read wrong (transformers 5's rope_parameters
    once was) shows in layer 0's attention, not only in the logits, with one layer in memory."""
    import dataclasses

    from kiln.conversion.layerwise import HFSide, MegatronSide, compare_layers
    from kiln.conversion.verify import sample_tokens
    from kiln.errors import ParityError

    kind, overrides = VARIANTS["llama31_rope_scaling"]
    directory = build(kind, tmp_path / "hf", std=0.3, **overrides)  # attention sharp enough for RoPE to matter
    source, hf_side = open_source(directory, 1, None), HFSide(directory)
    for base, breaks in ((source.config.rotary_base, None), (10000, "layer 0")):
        engine = MegatronSide(source.read, dataclasses.replace(source.config, rotary_base=base))
        try:
            if breaks is None:
                deltas = compare_layers(hf_side, engine, sample_tokens(1000), "same model")
                assert max(deltas.values()) <= 1e-5
            else:
                with pytest.raises(ParityError, match=breaks):
                    compare_layers(hf_side, engine, sample_tokens(1000), "wrong base")
        finally:
            engine.close()
        assert all(p.device.type == "meta" for p in hf_side.model.parameters())  # released after each use


@pytest.mark.parametrize("variant", ["llama31_rope_scaling", "gpt2"])
def test_nemo_archive_meets_each_requirement_of_nemo_aligners_loader(models, variant, tmp_path):
    """NeMo-Aligner 0.7.0 restores its policy through NeMo's NLPSaveRestoreConnector and
    MegatronGPTModel (requirements read from their sources: kiln/conversion/README.md)."""
    import json
    import tarfile

    import yaml

    out = tmp_path / "model.nemo"
    convert(ConvertConfig(source=str(models[variant]), output=str(out), to="nemo", tp=2))
    with tarfile.open(out, "r:") as tar:  # plain tar; no absolute, escaping or linked member
        members = {m.name: m for m in tar.getmembers()}
        assert all(not n.startswith("/") and ".." not in n.split("/") and not (m.issym() or m.islnk())
                   for n, m in members.items())
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml"))
        tar.extractall(tmp_path / "x", filter="data")
    assert members["./model_weights"].isdir() and not any("model_weights.ckpt" in n or "mp_rank_" in n
                                                            for n in members)
    weights = tmp_path / "x" / "model_weights"
    assert json.loads((weights / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    torch.load(weights / "common.pt", weights_only=True)
    reader = dcp.Reader(weights)
    assert all(k.startswith("model.") for k in reader.tensor_keys())
    assert reader.shape("model.decoder.layers.self_attention.linear_qkv.weight")[0] == cfg["num_layers"]
    assert cfg["mcore_gpt"] is True and cfg["optim"]["name"]
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "encoder_seq_length"):
        assert cfg[key], key
    assert cfg["normalization"] != "rmsnorm" or cfg["transformer_engine"] is True  # apex's norm is LayerNorm only
    tokenizer = cfg["tokenizer"]  # by directory, never a `nemo:` member NeMo 1 cannot resolve for HF tokenizers
    assert not any(str(v).startswith("nemo:") for v in tokenizer.values())
    assert tokenizer["library"] == "huggingface" and tokenizer["type"] == str(models[variant].resolve())
    rows = reader.shape("model.embedding.word_embeddings.weight")[0]
    assert rows == cfg["override_vocab_size"] and rows % 2 == 0  # the table as written, loadable at TP 2
    hf_config = json.loads((models[variant] / "config.json").read_text())
    if variant == "gpt2":  # megatron-core fuses only gelu and swiglu with the bias
        assert cfg["openai_gelu"] and cfg["bias_activation_fusion"] is False
    else:
        scaling = hf_config.get("rope_scaling") or hf_config["rope_parameters"]
        assert (cfg["scale_factor"], cfg["low_freq_factor"], cfg["high_freq_factor"], cfg["old_context_len"]) == (
            scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
            scaling["original_max_position_embeddings"])
