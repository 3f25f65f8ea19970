"""Mixtures of experts, HF <-> kiln Megatron: Mixtral (every layer MoE), Qwen2-MoE (shared expert with
its gate, top-k weights not renormalized, a dense layer) and Qwen3-MoE (q/k norms). Each converts
HF -> Megatron -> HF with logits and every layer checked by `kiln convert` itself (transformers' layers
against megatron-core's), every tensor back bit for bit; megatron-core's own dist-checkpointing loads
the converted checkpoints under EP=2; conversion holds about one expert at a time."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.config import ConvertConfig
from kiln.conversion import moe
from kiln.conversion.convert import convert
from kiln.conversion.hf import HFFormatError
from kiln.conversion.source import open_source
from kiln.conversion.verify import hf_logits, sample_tokens
from kiln.errors import ConfigError
from tests.conftest import free_port, launch, tiny_overrides
from tests.conversion.moe_models import COMMON, VARIANTS, build

HERE = Path(__file__).parent


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in glob.glob(f"{directory}/*.safetensors"):
        out.update(load_file(path))
    return out


class Converted(dict):
    """Each variant as HF, converted to Megatron and back, on first use: (hf, megatron, hf again, summaries)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str):
        kind, overrides = VARIANTS[name]
        d = self.root / name
        hf = build(kind, d / "hf", **overrides)
        there = convert(ConvertConfig(source=str(hf), output=str(d / "meg"), to="megatron"))
        back = convert(ConvertConfig(source=str(d / "meg"), output=str(d / "hf2"), to="hf"))
        self[name] = (hf, d / "meg", d / "hf2", (there, back))
        return self[name]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return Converted(tmp_path_factory.mktemp("moe"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_megatron_hf_is_bitwise_and_logit_exact(converted, variant):
    hf, _, back, summaries = converted[variant]
    for summary in summaries:
        assert summary["verified"] and summary["max_abs_logit_delta"] <= 1e-4
        assert list(summary["layer_max_abs_delta"]) == ["embedding", "layer 0", "layer 1", "logits"]
        assert max(summary["layer_max_abs_delta"].values()) <= 1e-5
    a, b = tensors(hf), tensors(back)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((back / "config.json").read_text())["model_type"] == VARIANTS[variant][0]


def test_config_round_trips_through_model_config(converted, tmp_path):
    for variant in ("mixtral", "qwen2_moe"):
        hf, _, back, _ = converted[variant]
        original, again = (json.loads((d / "config.json").read_text()) for d in (hf, back))
        for key in ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                    "intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob", "mlp_only_layers",
                    "decoder_sparse_step", "qkv_bias", "attention_bias", "router_aux_loss_coef", "num_key_value_heads",
                    "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "vocab_size"):
            assert original.get(key) == again.get(key), (variant, key)
        head_dim = original.get("head_dim") or original["hidden_size"] // original["num_attention_heads"]
        assert again["head_dim"] == head_dim
    qwen2 = open_source(converted["qwen2_moe"][0], 1, None).config
    assert qwen2.moe.layer_pattern == [1, 0] and qwen2.moe.shared_expert_gate
    assert not qwen2.moe.normalize_topk and qwen2.moe.ffn_hidden_size == 24 and qwen2.ffn_hidden_size == 48
    qwen3 = build(VARIANTS["qwen3_moe"][0], tmp_path / "qwen3", **VARIANTS["qwen3_moe"][1])
    config = json.loads((qwen3 / "config.json").read_text())
    m = moe.model_config(config)
    assert m.qk_layernorm and m.moe.normalize_topk and m.moe.layer_pattern is None and m.head_dim == 8
    again = moe.hf_config(m, "qwen3_moe")
    for key in ("num_local_experts", "moe_intermediate_size", "norm_topk_prob", "head_dim", "attention_bias"):
        assert config.get(key) is not None, key
        assert config.get(key) == again.get(key), key


def test_megatron_layouts_and_one_expert_access(converted):
    """Every layer MoE: stacked [layers, experts, ...]; with a dense layer megatron-core names each
    layer's tensors apart. expert_weights reads one expert, the same from HF and from Megatron."""
    from kiln.conversion.dcp import Reader

    stacked = Reader(glob.glob(f"{converted['mixtral'][1]}/checkpoints/iter_*")[0])
    assert stacked.shape(moe.EXPERT_FC1) == (2, 4, 96, 32) and stacked.shape(moe.EXPERT_FC2) == (2, 4, 32, 48)
    per_layer = Reader(glob.glob(f"{converted['qwen2_moe'][1]}/checkpoints/iter_*")[0])
    assert per_layer.shape("decoder.layers.0.mlp.experts.experts.linear_fc1.weight") == (4, 48, 32)
    assert per_layer.shape("decoder.layers.1.mlp.linear_fc1.weight") == (96, 32)
    assert per_layer.shape("decoder.layers.0.mlp.shared_experts.gate_weight") == (1, 32)
    for variant in ("mixtral", "qwen2_moe"):
        hf, meg = (open_source(converted[variant][i], 1, None) for i in (0, 1))
        fc1, fc2 = moe.expert_weights(meg.read, 0, 3)
        for a, b in zip((fc1, fc2), moe.expert_weights(hf.read, 0, 3), strict=True):
            assert torch.equal(a, b)
    gate, up = moe.expert_weights(open_source(converted["mixtral"][1], 1, None).read, 1, 2)[0].chunk(2)
    disk = tensors(converted["mixtral"][0])
    assert torch.equal(gate, disk["model.layers.1.block_sparse_moe.experts.2.w1.weight"])
    assert torch.equal(up, disk["model.layers.1.block_sparse_moe.experts.2.w3.weight"])


def test_moe_layer_norm_has_the_transformer_engine_specs_key(converted):
    """On GPU an MoE layer's pre-MLP norm is TE's own module (no fc1 to fuse into), saved as
    pre_mlp_layernorm.weight; megatron-core's local spec would save it under the fused dense name.
    kiln's engine and conversion use TE's name, so an MoE checkpoint moves between CPU and GPU."""
    import megatron.core.extensions.transformer_engine as te

    from kiln.conversion.dcp import Reader
    from tests.conversion.te_spec import te_layer_spec

    layer = te_layer_spec(num_experts=4, moe_grouped_gemm=True).submodules
    assert layer.pre_mlp_layernorm is te.TENorm
    assert not any(k.startswith("pre_mlp_layernorm") for k in layer.sharded_state_dict_keys_map)
    stacked = Reader(glob.glob(f"{converted['mixtral'][1]}/checkpoints/iter_*")[0])
    assert stacked.shape(moe.MOE_NORM) == (2, 32) and moe.DENSE_NORM not in stacked.tensor_keys()
    per_layer = Reader(glob.glob(f"{converted['qwen2_moe'][1]}/checkpoints/iter_*")[0])  # layer 1 is dense
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in per_layer.tensor_keys()
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in per_layer.tensor_keys()


@pytest.mark.slow
def test_expert_parallel_load_of_converted_checkpoints(converted, tmp_path):
    """megatron-core's dist-checkpointing loads the converted checkpoints (stacked, per-layer keys, q/k
    norms) into kiln's engine at EP=2
    (2 processes, 2 experts each), every key matched, and the logits equal transformers'."""
    jobs = {v: (converted[v][1], tmp_path / f"{v}.pt") for v in VARIANTS}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(HERE / "moe_ep_forward.py"), "2",
           *[str(p) for job in jobs.values() for p in job]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for variant, (_, out) in jobs.items():
        reference = hf_logits(converted[variant][0], sample_tokens(300))
        delta = (torch.load(out) - reference).abs().max().item()
        print(f"EP=2 load of {variant}: max |delta logit| vs transformers {delta:.2e}")
        assert delta <= 1e-4, variant


@pytest.mark.slow
def test_checkpoint_trained_at_ep2_converts_to_hf(demo_data, tmp_path):
    """`kiln pretrain` of the tiny MoE recipe at EP=2 saves megatron-core's chained optimizers
    (`chained_<i>.optimizer.…`) beside the weights; the checkpoint converts to an HF Mixtral, checked
    layer by layer and by logits against kiln's engine."""
    launch(2, [tiny_overrides(demo_data, tmp_path / "run", train__steps="3", checkpoint__save_interval="3",
                              parallel__ep="2")], recipe="tiny_moe")
    summary = convert(ConvertConfig(source=str(tmp_path / "run" / "checkpoints"), output=str(tmp_path / "hf"),
                                    to="hf"))
    assert summary["verified"] and summary["max_abs_logit_delta"] <= 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    assert (tmp_path / "hf" / "tokenizer.json").exists()


MEMORY_CHILD = r"""
import json, sys
from kiln.config import ConvertConfig
from kiln.conversion.convert import convert

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def measured(cfg):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one
    base = status("VmRSS")
    convert(cfg)
    return status("VmHWM") - base

small, big, out = sys.argv[1:4]
convert(ConvertConfig(source=small, output=out + "/warm", to="megatron", verify=False))  # imports, first uses
peaks = {"to_megatron": measured(ConvertConfig(source=big, output=out + "/meg", to="megatron", verify=False)),
         "to_hf": measured(ConvertConfig(source=out + "/meg", output=out + "/hf", to="hf", verify=False))}
print(json.dumps(peaks))
"""


def write_mixtral(directory: Path, h: int, ffn: int, experts: int, layers: int) -> dict[str, tuple[int, ...]]:
    """A Mixtral directory of constant bf16 weights, streamed to disk (never whole in memory)."""
    from kiln.conversion.safetensors_io import Entry, StreamWriter

    config = {"model_type": "mixtral", "hidden_size": h, "intermediate_size": ffn, "num_hidden_layers": layers,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64,
              "num_local_experts": experts, "num_experts_per_tok": 2, "tie_word_embeddings": False}
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (256, h), "model.norm.weight": (h,), "lm_head.weight": (256, h)}
    for i in range(layers):
        layer = f"model.layers.{i}."
        shapes.update({layer + "input_layernorm.weight": (h,), layer + "post_attention_layernorm.weight": (h,),
                       layer + "self_attn.q_proj.weight": (h, h), layer + "self_attn.k_proj.weight": (h // 4, h),
                       layer + "self_attn.v_proj.weight": (h // 4, h), layer + "self_attn.o_proj.weight": (h, h),
                       layer + "block_sparse_moe.gate.weight": (experts, h)})
        for e in range(experts):
            expert = f"{layer}block_sparse_moe.experts.{e}."
            shapes.update({expert + "w1.weight": (ffn, h), expert + "w3.weight": (ffn, h),
                           expert + "w2.weight": (h, ffn)})
    entries = [Entry(name, shape, torch.bfloat16) for name, shape in shapes.items()]
    writer = StreamWriter(directory / "model.safetensors", entries)
    for e in entries:
        writer.write(e.name, torch.full(e.shape, 0.01, dtype=torch.bfloat16))
    writer.close()
    return shapes


def test_conversion_holds_about_one_expert(tmp_path):
    """A Mixtral whose layer of experts is 48 MiB (8 experts of 6 MiB, bf16) converts both ways with the
    peak resident set growing by less than that layer of experts (after a warm-up on a tiny model).
    Measured: HF -> Megatron 5.6 experts (a few experts' buffers: two halves of fc1 in flight, DCP's
    last chunk per key, allocator slack; 6.2 with 16 experts a layer, so it does not grow with the
    layer), Megatron -> HF 0.2."""
    h, ffn, experts = 512, 2048, 8
    write_mixtral(tmp_path / "small", 64, 128, experts, 2)
    shapes = write_mixtral(tmp_path / "big", h, ffn, experts, 2)
    expert_bytes = 3 * ffn * h * 2
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path / "small"), str(tmp_path / "big"),
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    print("peak resident growth:", {k: f"{v / expert_bytes:.1f} experts" for k, v in peaks.items()})
    for direction, value in peaks.items():
        assert value < experts * expert_bytes, direction
    again = tensors(tmp_path / "hf")
    assert again.keys() == set(shapes)
    assert torch.equal(again["model.layers.1.block_sparse_moe.experts.7.w2.weight"],
                       torch.full((h, ffn), 0.01, dtype=torch.bfloat16))


def test_refusals_name_the_field(tmp_path):
    kind, overrides = VARIANTS["mixtral"]
    hf = build(kind, tmp_path / "hf", **overrides)
    cfg = json.loads((hf / "config.json").read_text())
    for change, field in ((dict(router_jitter_noise=0.1), "router_jitter_noise"),
                          (dict(hidden_act="gelu"), "hidden_act"),
                          (dict(sliding_window=16), "sliding_window")):
        with pytest.raises(ConfigError, match=field):
            moe.model_config({**cfg, **change})
    qwen = json.loads((build(VARIANTS["qwen2_moe"][0], tmp_path / "q", **VARIANTS["qwen2_moe"][1])
                       / "config.json").read_text())
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        moe.model_config({**qwen, "mlp_only_layers": [0, 1]})
    with pytest.raises(ConfigError, match="to=megatron or to=hf"):
        convert(ConvertConfig(source=str(hf), output=str(tmp_path / "x.nemo"), to="nemo"))
    m = moe.model_config(cfg)
    for change, field in ((dict(score_function="sigmoid"), "score_function"),
                          (dict(capacity_factor=1.0), "capacity_factor"),
                          (dict(layer_pattern=[1, 0]), "layer_pattern")):
        with pytest.raises(ConfigError, match=field):
            moe.model_type_for(dataclasses.replace(m, moe=dataclasses.replace(m.moe, **change)))


def test_fused_expert_tensors_are_refused_clearly(tmp_path):
    """A directory saved with transformers' in-memory layout (all experts in one tensor) is named as such."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, overrides = VARIANTS["qwen3_moe"]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{**COMMON, **overrides}))
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    with pytest.raises(HFFormatError, match="per-expert tensors"):
        open_source(tmp_path, 1, None)
