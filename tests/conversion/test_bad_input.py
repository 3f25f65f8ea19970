"""Bad checkpoints fail clearly and leave nothing behind."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from kiln.config import ConvertConfig
from kiln.conversion.convert import convert
from kiln.conversion.hf import HFFormatError
from kiln.conversion.megatron import MegatronFormatError
from kiln.conversion.nemo import NemoFormatError
from kiln.errors import ConfigError
from tests.conversion.models import build


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build("llama", tmp_path_factory.mktemp("hf") / "llama")


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_nothing_written(tmp_path, output):
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or p.name.endswith(".staging")]


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_unknown_architecture(llama, tmp_path):
    src = copy(llama, tmp_path / "src")
    edit_config(src, model_type="bert")
    with pytest.raises(ConfigError, match=r"model_type 'bert' is not a family kiln converts; supported: gpt2, "
                                          r"llama, mistral, mixtral, qwen2, qwen2_moe, qwen3_moe"):
        convert(ConvertConfig(source=str(src), output=str(tmp_path / "out"), to="megatron"))
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 3}, r"the weights do not match config.json \(3 layers.*missing \['model.layers.2"),
    ({"intermediate_size": 128}, r"decoder.layers.mlp.linear_fc1.weight would be \(2, 320, 64\), but config.json "
                                 r"implies \(2, 256, 64\)"),
    ({"num_key_value_heads": 4}, r"self_attn.q_proj.weight.*do not fit config.json"),
])
def test_config_that_does_not_match_the_weights(llama, tmp_path, changes, message):
    src = copy(llama, tmp_path / "src")
    edit_config(src, **changes)
    with pytest.raises(HFFormatError, match=message):
        convert(ConvertConfig(source=str(src), output=str(tmp_path / "out"), to="megatron"))
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_unexpected_tensors_are_named(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    src = copy(llama, tmp_path / "src")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.0.mlp.extra.weight"] = weights["model.norm.weight"].clone()
    save_file(weights, src / "model.safetensors")
    with pytest.raises(HFFormatError, match=r"unexpected \['model.layers.0.mlp.extra.weight'\]"):
        convert(ConvertConfig(source=str(src), output=str(tmp_path / "out"), to="hf"))


def test_truncated_safetensors(llama, tmp_path):
    src = copy(llama, tmp_path / "src")
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(HFFormatError, match=r"model.safetensors is truncated: .* download it again"):
        convert(ConvertConfig(source=str(src), output=str(tmp_path / "out"), to="megatron"))
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_dist_checkpoint_missing_a_shard(llama, tmp_path):
    meg = tmp_path / "meg"
    convert(ConvertConfig(source=str(llama), output=str(meg), to="megatron"))
    shard = next((meg / "checkpoints" / "iter_0000000").glob("*.distcp"))
    shard.unlink()
    with pytest.raises(MegatronFormatError, match=rf"is missing shard files {shard.name} named by its .metadata"):
        convert(ConvertConfig(source=str(meg), output=str(tmp_path / "out"), to="hf"))
    assert_nothing_written(tmp_path, tmp_path / "out")


def _archive(path, members):
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("member, message", [
    (_file("../escape.txt"), r"member '../escape.txt' escapes the target directory"),
    (_file("model_weights/../../escape.txt"), r"escapes the target directory"),
    (_file("/etc/kiln-escape"), r"member '/etc/kiln-escape' has an absolute path"),
    (_link("model_config.yaml", "/etc/passwd"), r"member 'model_config.yaml' is a link"),
    (_link("hard", "model_config.yaml", tarfile.LNKTYPE), r"member 'hard' is a link"),
])
def test_unsafe_nemo_archives_are_refused(tmp_path, member, message):
    archive = _archive(tmp_path / "bad.nemo", [_file("model_config.yaml", b"num_layers: 1\n"), member])
    with pytest.raises(NemoFormatError, match=message):
        convert(ConvertConfig(source=str(archive), output=str(tmp_path / "out"), to="hf"))
    assert not (tmp_path.parent / "escape.txt").exists()
    assert_nothing_written(tmp_path, tmp_path / "out")
