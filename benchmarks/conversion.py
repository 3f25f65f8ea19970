"""Conversion speed and memory on a ~1.1B-parameter Llama (TinyLlama's shape, random bf16 weights
written locally): HF -> Megatron (TP2) -> HF and HF -> TensorRT-LLM (TP2), against `cp` of the same
bytes (the disk's speed) and transformers' from_pretrained + save_pretrained.

Each operation runs in its own process; its peak RSS comes from wait4(2) for that process alone.
Times are measured around the operation inside the process (imports excluded, reported apart).
Targets: each kiln conversion <= 2x the copy time, peak RSS <= 0.5x the checkpoint size.

    python benchmarks/conversion.py [--layers 22] [--workdir /tmp/kiln-bench-conversion]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
op, src, dst = sys.argv[1:4]
if op == "transformers":
    from transformers import AutoModelForCausalLM
    ready = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(dst)
else:
    from kiln.config import ConvertConfig, ExportConfig
    from kiln.conversion.convert import convert
    from kiln.export.trtllm import export
    ready = time.perf_counter()
    if op == "trtllm":
        export(ExportConfig(source=src, output=dst, tp=2, dtype="bfloat16", verify=False))
    else:
        convert(ConvertConfig(source=src, output=dst, to=op, tp=2, verify=False))
print(json.dumps({"seconds": time.perf_counter() - ready, "import_seconds": ready - t0}))
"""


def make_model(directory: Path, layers: int) -> int:
    from kiln.conversion import llama
    from kiln.conversion.safetensors_io import Entry, StreamWriter
    from kiln.recipes.models import llama as llama_config

    m = llama_config(layers, 2048, 32, 4, 5632, vocab_size=32000, max_position_embeddings=2048, rotary_base=10000)
    directory.mkdir(parents=True)
    shapes = {"model.embed_tokens.weight": (32000, 2048), "model.norm.weight": (2048,), "lm_head.weight": (32000, 2048)}
    per_layer = {"input_layernorm.weight": (2048,), "post_attention_layernorm.weight": (2048,),
                 "self_attn.q_proj.weight": (2048, 2048), "self_attn.k_proj.weight": (256, 2048),
                 "self_attn.v_proj.weight": (256, 2048), "self_attn.o_proj.weight": (2048, 2048),
                 "mlp.gate_proj.weight": (5632, 2048), "mlp.up_proj.weight": (5632, 2048),
                 "mlp.down_proj.weight": (2048, 5632)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    entries = [Entry(name, shape, torch.bfloat16) for name, shape in shapes.items()]
    writer = StreamWriter(directory / "model.safetensors", entries)
    generator = torch.Generator().manual_seed(0)
    for e in entries:
        writer.write(e.name, (torch.randn(e.shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    config = {**llama.hf_config(m), "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config))
    return sum(e.nbytes for e in entries)


def run(op: str, src: Path, dst: Path) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, op, str(src), str(dst)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{op} failed")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss": usage.ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--workdir", default="/tmp/kiln-bench-conversion")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    try:
        size = make_model(work / "hf", args.layers)
        tic = time.perf_counter()
        subprocess.run(["cp", "-r", str(work / "hf"), str(work / "copy")], check=True)
        copy = time.perf_counter() - tic
        results = {
            "kiln HF -> Megatron (TP2)": run("megatron", work / "hf", work / "meg"),
            "kiln Megatron -> HF": run("hf", work / "meg", work / "hf2"),
            "kiln HF -> TensorRT-LLM (TP2)": run("trtllm", work / "hf", work / "trt"),
            "transformers load + save": run("transformers", work / "hf", work / "tf"),
        }
        print(f"checkpoint: {size / 1e9:.2f} GB bf16 ({size / 2e9:.2f}B parameters, {args.layers} layers); "
              f"cp: {copy:.2f} s ({size / copy / 1e9:.2f} GB/s)")
        print(f"{'operation':<32}{'seconds':>9}{'x cp':>8}{'peak RSS GB':>13}{'x ckpt':>9}   (+ imports)")
        for name, r in results.items():
            print(f"{name:<32}{r['seconds']:>9.2f}{r['seconds'] / copy:>8.2f}{r['peak_rss'] / 1e9:>13.2f}"
                  f"{r['peak_rss'] / size:>9.2f}   (+{r['import_seconds']:.1f} s)")
        print("targets: kiln conversions <= 2.00 x cp and <= 0.50 x checkpoint size in peak RSS")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
