"""`make gpu-check`: every GPU-only path of kiln, on the GPU(s) at hand, in one run (< 10 minutes
on one GPU), ending with one table of pass / fail / skip and figures.

    python tools/gpu_check.py [--workdir DIR] [--only NAME,...] [--steps N] [--cpu]

Run it in the kiln image (docker/README.md) on the first GPU host. Each check drives kiln the way
a user does (the `kiln` command), so what passes here is what a job runs:

  environment    torch / CUDA / TransformerEngine / megatron-core versions as imported
  pretrain       TE layer spec, bf16, the smoke recipe (20 steps) against its recorded GPU curve
  tp2            the same at TP=2 when two GPUs are visible (two NCCL ranks cannot share one GPU)
  sft_thd        packed SFT: THD packed sequences (cu_seqlens) through TransformerEngine attention
  lora_te        LoRA on TE's fused norm+linear layers: the merged checkpoint's loss = base + adapter
  converted      a checkpoint converted from HF (kiln convert) loads strictly into the TE spec and
                 gives the same loss as the checkpoint it came from
  curator_gpu    NeMo Curator's cuDF dedup workflows keep the documents kiln's CPU path keeps
  trtllm         trtllm-build on kiln's TensorRT-LLM export, greedy tokens = transformers' on the HF export
  moe            a mixture of experts on TE's spec with grouped GEMM (TEGroupedMLP), bf16: loss falls,
                 every token reaches top-k experts, the checkpoint holds SequentialMLP's expert keys
  moe_ep2        the same at EP=2 with the alltoall dispatcher over NCCL, against the EP=1 run

`--cpu` runs the checks that have a CPU form (fp32, the local layer spec) to test this script
itself; CI does that with `--steps 3`. A check whose hardware or library is absent is SKIP.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "demo" / "corpus.jsonl"
RECORDED = ROOT / "tests" / "assets" / "losses" / "pretrain_smoke_gpu_bf16.json"


class Skip(Exception):
    pass


def kiln(*args: str, timeout: int = 600) -> str:
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if out.returncode != 0:
        tail = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()][-6:]
        raise RuntimeError(f"kiln {' '.join(args[:2])} failed: " + " | ".join(tail))
    return out.stdout


def metrics(run_dir: Path) -> dict[int, dict]:
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


class Checks:
    def __init__(self, work: Path, steps: int, cpu: bool):
        self.work, self.steps, self.cpu = work, steps, cpu
        self.gpus = 0 if cpu else _gpu_count()
        self.data = work / "data"
        self.common = ["logging.tensorboard=false", "logging.progress_bar=false", "train.eval_interval=0"]

    def need_gpu(self, count: int = 1) -> None:
        if self.cpu:
            return
        if self.gpus < count:
            raise Skip(f"needs {count} GPU(s), {self.gpus} visible")

    def prepared(self) -> Path:
        if not (self.data / "kiln.json").exists():
            kiln("prepare", "--input", str(CORPUS), "--output", str(self.data), "--vocab-size", "2048")
        return self.data

    def pretrain_args(self, run_dir: Path) -> list[str]:
        data = self.prepared()
        short = ["schedule.warmup_steps=1"] if self.steps <= 5 else []  # the recipe warms up over 5 of its 20
        return [f"run_dir={run_dir}", f"data.blend=[{data}/corpus_text_document]", f"data.tokenizer={data}/tokenizer",
                f"train.steps={self.steps}", "parallel.tp=1", "parallel.world_size=1", *short, *self.common]

    def environment(self) -> str:
        import torch

        parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}", f"{self.gpus} GPU(s)"]
        if self.gpus:
            parts.append(torch.cuda.get_device_name(0))
        from megatron.core.package_info import __version__ as mcore

        parts.append(f"megatron-core {mcore}")
        try:
            from importlib.metadata import version

            import transformer_engine.pytorch  # noqa: F401

            parts.append(f"TE {version('transformer-engine')}")
        except (ImportError, RuntimeError, OSError) as exc:
            if not self.cpu:
                raise RuntimeError(f"TransformerEngine does not import: {exc}") from None
            parts.append("no TE")
        return ", ".join(parts)

    def pretrain(self) -> str:
        self.need_gpu()
        run = self.work / "pretrain"
        out = kiln("pretrain", "--recipe", "smoke", "--nproc", "1", *self.pretrain_args(run))
        m = metrics(run)
        first, last = m[1]["loss"], m[self.steps]["loss"]
        if not last < first:
            raise RuntimeError(f"loss did not fall: {first:.4f} -> {last:.4f}")
        if not self.cpu and "bf16" not in out:
            raise RuntimeError("the run did not use bf16")
        curve = {str(s): r["loss"] for s, r in sorted(m.items())}
        note = ""
        if not self.cpu and self.steps == 20:
            if RECORDED.exists():
                reference = json.loads(RECORDED.read_text())
                worst = max(abs(curve[s] - reference[s]) for s in reference)
                if worst > 5e-2:
                    raise RuntimeError(f"deviates {worst:.3f} from {RECORDED.name}")
                note = f", max |delta| vs recorded curve {worst:.3f}"
            else:
                (self.work / RECORDED.name).write_text(json.dumps(curve, indent=1) + "\n")
                note = f", curve recorded in {self.work / RECORDED.name} (commit it as {RECORDED})"
        return f"loss {first:.3f} -> {last:.3f} in {self.steps} steps{note}"

    def tp2(self) -> str:
        self.need_gpu(2)
        run = self.work / "tp2"
        args = [a for a in self.pretrain_args(run) if not a.startswith(("parallel.tp=", "parallel.world_size="))]
        kiln("pretrain", "--recipe", "smoke", "--nproc", "2", "parallel.tp=2", "parallel.world_size=2", *args)
        one, two = metrics(self.work / "pretrain"), metrics(run)
        gap = abs(one[self.steps]["loss"] - two[self.steps]["loss"])
        if gap > 0.3:
            raise RuntimeError(f"TP=2 ends {gap:.3f} away from TP=1")
        return f"final loss TP=2 {two[self.steps]['loss']:.3f} vs TP=1 {one[self.steps]['loss']:.3f}"

    def sft_args(self, run: Path, weights: Path, *extra: str) -> list[str]:
        data = self.prepared()
        return ["--recipe", "smoke", f"run_dir={run}", f"checkpoint.load_weights={weights}",
                f"data.tokenizer={data}/tokenizer", f"train.steps={self.steps}", *self.common, *extra]

    def sft_thd(self) -> str:
        self.need_gpu()
        run = self.work / "sft"
        kiln("sft", *self.sft_args(run, self.work / "pretrain" / "checkpoints"))
        losses = [r["loss"] for r in metrics(run).values()]
        if not all(v == v and v < 20 for v in losses):
            raise RuntimeError(f"packed SFT losses {losses}")
        if self.steps >= 8 and not losses[-1] < losses[0]:  # a few steps from a 3-step model may not descend
            raise RuntimeError(f"packed SFT loss did not fall: {losses}")
        return f"packed SFT loss {losses[0]:.3f} -> {losses[-1]:.3f}"

    def lora_te(self) -> str:
        self.need_gpu()
        run = self.work / "lora"
        kiln("sft", *self.sft_args(run, self.work / "pretrain" / "checkpoints", "lora.enabled=true",
                                   "optimizer.lr=5e-3"))
        summary = json.loads((run / "kiln.json").read_text())["summary"]
        before, after = summary["merge_loss_before"], summary["merge_loss_after"]
        if abs(before - after) > 2e-2 * max(1.0, abs(before)):
            raise RuntimeError(f"merged checkpoint loss {after:.4f} != base + adapter {before:.4f}")
        return f"base + adapter {before:.4f}, merged {after:.4f}"

    def converted(self) -> str:
        self.need_gpu()
        hf, meg = self.work / "hf", self.work / "megatron"
        kiln("convert", str(self.work / "pretrain"), "--to", "hf", "--output", str(hf))
        # --tp 8: 128 x 8 rows, the 1024 the smoke model pads its vocabulary to (tiny pads to 256 x TP)
        kiln("convert", str(hf), "--to", "megatron", "--output", str(meg), "--tp", "8")
        direct, converted = self.work / "sft_direct", self.work / "sft_converted"
        for run, weights in ((direct, self.work / "pretrain" / "checkpoints"), (converted, meg / "checkpoints")):
            kiln("sft", *self.sft_args(run, weights, "train.steps=1", "schedule.warmup_steps=0", "data.packing=false"))
        a, b = metrics(direct)[1]["loss"], metrics(converted)[1]["loss"]
        # the HF round trip drops the padded vocabulary rows and restores them as zeros, which moves
        # the softmax a little (~0.03 here); a wrong mapping or a norm left at its init moves it by units
        if abs(a - b) > 0.1:
            raise RuntimeError(f"first-step loss {b:.4f} from the converted checkpoint, {a:.4f} from the original")
        return f"strict TE-spec load; first-step loss {b:.4f} vs {a:.4f} from the original"

    def moe(self) -> str:
        self.need_gpu()
        m = _moe_check(self, "moe", ep=1)
        last = m[self.steps]
        return (f"loss {m[1]['loss']:.3f} -> {last['loss']:.3f}, aux loss {last['moe_load_balancing_loss']:.3f}, "
                f"expert imbalance {last['expert_imbalance']:.2f}")

    def moe_ep2(self) -> str:
        self.need_gpu(2)
        if not (self.work / "moe" / "metrics.jsonl").exists():
            raise Skip("needs the moe check's EP=1 run first")
        one, two = metrics(self.work / "moe"), _moe_check(self, "moe_ep2", ep=2)
        gap = abs(one[self.steps]["loss"] - two[self.steps]["loss"])
        if gap > 0.1:
            raise RuntimeError(f"EP=2 ends {gap:.3f} away from EP=1")
        return f"final loss EP=2 {two[self.steps]['loss']:.3f} vs EP=1 {one[self.steps]['loss']:.3f}"

    def moe_converted(self) -> str:
        """The moe check's checkpoint (on a GPU: TE spec, grouped-GEMM experts, TE's pre-MLP norm) ->
        HF Mixtral (logits checked) -> a Megatron checkpoint written by kiln's converter -> one step
        from each on this machine's spec: the converted weights load strictly and give the first-step
        loss of the original's (within the padded-vocabulary rows' effect, as in `converted`)."""
        self.need_gpu()
        if not (self.work / "moe" / "metrics.jsonl").exists():
            raise Skip("needs the moe check's run first")
        hf, meg = self.work / "moe_hf", self.work / "moe_megatron"
        kiln("convert", str(self.work / "moe"), "--to", "hf", "--output", str(hf))
        kiln("convert", str(hf), "--to", "megatron", "--output", str(meg), "--tp", "8")  # the 1024 padded rows
        loss = {}
        for name, weights in (("direct", self.work / "moe" / "checkpoints"), ("converted", meg / "checkpoints")):
            run = self.work / f"moe_{name}"
            kiln("pretrain", "--recipe", "smoke", "--nproc", "1", *MOE, *self.pretrain_args(run), "train.steps=1",
                 "schedule.warmup_steps=0", f"checkpoint.load_weights={weights}")
            loss[name] = metrics(run)[1]["loss"]
        if abs(loss["direct"] - loss["converted"]) > 0.1:
            raise RuntimeError(f"first-step loss {loss['converted']:.4f} from the converted MoE checkpoint, "
                               f"{loss['direct']:.4f} from the original")
        return f"HF Mixtral and back, strict load; first-step loss {loss['converted']:.4f} vs {loss['direct']:.4f}"

    def curator_gpu(self) -> str:
        if self.cpu:
            raise Skip("needs cuDF")
        from kiln.curation.gpu import cudf_available

        if not cudf_available():
            raise Skip("cuDF (NeMo Curator's GPU extra) does not import")
        corpus = self.work / "dedup.jsonl"
        _dedup_corpus(corpus)
        kept = {}
        for backend in ("cpu", "gpu"):
            out = self.work / f"curated_{backend}"
            kiln("curate", "--input", str(corpus), "--output", str(out), f"dedup_backend={backend}",
                 "filters.enabled=false")
            kept[backend] = {json.loads(line)["id"] for f in sorted(out.glob("curated_*.jsonl"))
                             for line in f.read_text().splitlines()}
        if kept["cpu"] != kept["gpu"]:
            raise RuntimeError(f"kept sets differ: {len(kept['cpu'] - kept['gpu'])} only on CPU, "
                               f"{len(kept['gpu'] - kept['cpu'])} only on GPU")
        return f"{len(kept['gpu'])} documents kept by both"

    def trtllm(self) -> str:
        if self.cpu:
            raise Skip("needs a GPU and TensorRT-LLM")
        if not shutil.which("trtllm-build"):
            raise Skip("trtllm-build is not here: run this check in nvcr.io/nvidia/tensorrt-llm/release")
        hf, out = self.work / "hf", self.work / "trtllm"
        kiln("export", str(hf), "--to", "trtllm", "--output", str(out), "--dtype", "float16")
        subprocess.run(["bash", str(out / "build.sh")], check=True, capture_output=True, timeout=600)
        return _compare_generation(hf, out / "engines")

    def trtllm_moe(self) -> str:
        """The moe_converted check's HF Mixtral exported at TP=1, TP=2 as expert TP 2, TP=2 as EP 2:
        trtllm-build loads every rank's shards into TensorRT-LLM's MoE model; greedy tokens equal
        transformers' wherever enough GPUs are visible (a TP=2 engine on one GPU is built, not run)."""
        if self.cpu:
            raise Skip("needs a GPU and TensorRT-LLM")
        if not shutil.which("trtllm-build"):
            raise Skip("trtllm-build is not here: run this check in nvcr.io/nvidia/tensorrt-llm/release")
        hf = self.work / "moe_hf"
        if not (hf / "config.json").exists():
            raise Skip("needs the moe_converted check's HF directory first")
        figures = []
        for tp, ep in ((1, 1), (2, 1), (2, 2)):
            out = self.work / f"moe_trtllm_tp{tp}_ep{ep}"
            kiln("export", str(hf), "--to", "trtllm", "--output", str(out), "--tp", str(tp), "--ep", str(ep),
                 "--dtype", "float16")
            subprocess.run(["bash", str(out / "build.sh")], check=True, capture_output=True, timeout=600)
            figures.append(f"tp{tp}/ep{ep}: " + (_compare_generation(hf, out / "engines") if tp <= self.gpus
                                                 else "built, not run"))
        return "; ".join(figures)


MOE = ["model.moe.num_experts=4", "model.moe.topk=2", "model.moe.ffn_hidden_size=192"]
EXPERT_KEY = "decoder.layers.mlp.experts.experts.linear_fc1.weight"


def _moe_check(checks: Checks, name: str, ep: int) -> dict[int, dict]:
    """megatron-core 0.16.1 builds TE-spec experts as TEGroupedMLP (TE's GroupedLinear, one grouped
    GEMM per expert layer) when moe_grouped_gemm is set, which kiln sets whenever TE imports on a GPU;
    its sharded state dict is documented as interchangeable with SequentialMLP's (the CPU spec's)."""
    run = checks.work / name
    args = [a for a in checks.pretrain_args(run) if not a.startswith("parallel.world_size=")]
    out = kiln("pretrain", "--recipe", "smoke", "--nproc", str(ep), f"parallel.world_size={ep}", f"parallel.ep={ep}",
               "parallel.moe_dispatcher=alltoall", *MOE, *args)
    if not checks.cpu and "bf16" not in out:
        raise RuntimeError("the run did not use bf16")
    m = metrics(run)
    first, last = m[1]["loss"], m[checks.steps]["loss"]
    if not last < first:
        raise RuntimeError(f"loss did not fall: {first:.4f} -> {last:.4f}")
    from kiln.recipes.pretrain import smoke

    cfg = smoke()
    routed = cfg.train.global_batch_size * cfg.train.seq_length * 2  # top-2
    for layer, counts in m[1]["expert_tokens"].items():
        if sum(counts) != routed:
            raise RuntimeError(f"layer {layer} routed {sum(counts)} token-expert pairs, expected {routed}")
    from kiln.training import checkpoint

    shape = tuple(checkpoint.read_tensors(run / "checkpoints", EXPERT_KEY)[EXPERT_KEY].shape)
    if shape[:2] != (cfg.model.num_layers, 4):
        raise RuntimeError(f"{EXPERT_KEY} has shape {shape}, not (layers, experts, ...)")
    return m


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _dedup_corpus(path: Path) -> None:
    """Documents from the demo corpus, with exact copies and one-word edits planted."""
    lines = CORPUS.read_text().splitlines()[:300]
    docs = [json.loads(line)["text"] for line in lines]
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(docs)]
    rows += [{"id": f"copy{i}", "text": docs[i]} for i in range(0, 300, 10)]
    rows += [{"id": f"near{i}", "text": docs[i].replace(" the ", " a ", 1)} for i in range(5, 300, 10)
             if len(docs[i].split()) > 200]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _compare_generation(hf: Path, engines: Path) -> str:
    import torch
    from tensorrt_llm import SamplingParams
    from tensorrt_llm._tensorrt_engine import LLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    prompts = ["The kiln", "Every morning the potter", "In the yard"]
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float16).cuda()
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.cuda()
        out = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        expected.append(out[0, ids.shape[1]:].tolist())
    del model
    llm = LLM(model=str(engines), tokenizer=str(hf))
    results = llm.generate(prompts, SamplingParams(max_tokens=16, top_k=1, ignore_eos=True))
    got = [list(r.outputs[0].token_ids) for r in results]
    same = sum(a == b for a, b in zip(expected, got, strict=True))
    if same != len(prompts):
        raise RuntimeError(f"greedy tokens agree on {same}/{len(prompts)} prompts: {expected} vs {got}")
    return f"greedy tokens equal on {same}/{len(prompts)} prompts x 16 tokens"


ORDER = ("environment", "pretrain", "tp2", "sft_thd", "lora_te", "converted", "moe", "moe_ep2", "moe_converted",
         "curator_gpu", "trtllm", "trtllm_moe")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--only", help="comma-separated checks to run")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="run the checks that have a CPU form (tests this script)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else ORDER
    unknown = set(names) - set(ORDER)
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}; choose from {', '.join(ORDER)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kiln-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    checks = Checks(work, args.steps, args.cpu)
    rows, failed = [], False
    for name in names:
        tic = time.perf_counter()
        try:
            status, figures = "PASS", getattr(checks, name)()
        except Skip as why:
            status, figures = "SKIP", str(why)
        except Exception as exc:  # noqa: BLE001 -- a failing check is a row of the table, not the end of the run
            status, figures, failed = "FAIL", f"{type(exc).__name__}: {exc}", True
        rows.append((name, status, f"{time.perf_counter() - tic:.0f}s", figures))
        print(f"{name}: {status} {figures}", flush=True)
    widths = [max(len(r[i]) for r in rows + [("check", "result", "time", "")]) for i in range(3)]
    print()
    print(f"{'check':<{widths[0]}}  {'result':<{widths[1]}}  {'time':>{widths[2]}}  figures")
    for name, status, seconds, figures in rows:
        print(f"{name:<{widths[0]}}  {status:<{widths[1]}}  {seconds:>{widths[2]}}  {figures}")
    print(f"\nruns kept in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
