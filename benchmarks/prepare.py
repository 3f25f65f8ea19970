"""`kiln prepare` end to end against Megatron-LM's tools/preprocess_data.py, same corpus, tokenizer and cores.

Corpus: a JSONL of real text from this machine, built deterministically (sorted walk, fixed
order): /usr/share/common-licenses, the Python standard library's sources, then /usr/share/doc
(.gz decompressed; binary, non-UTF-8 and machine-output files left out), each file cut at line
ends into documents of at most 16 KiB, until --mib MiB. Tokenizer: a 32k byte-level BPE
trained once by kiln on the corpus's first 32 MiB (cached with the corpus under --work).

Peer: Megatron-LM at a pinned commit (core_v0.16.1, the release of the megatron-core kiln pins;
newer commits need Python 3.12), tools/preprocess_data.py run unchanged with
`--tokenizer-type HuggingFaceTokenizer --append-eod --workers 2`. It comes from --megatron-lm
(a checkout or a git directory that holds the commit), else a clone of github.com/NVIDIA/Megatron-LM
into --work. megatron.training imports triton (never used to preprocess): when this Python lacks
it, `pip install --no-deps --target <work>/megatron-deps triton` puts it beside the checkout.

Each run is a fresh process pinned to the same --cores CPUs (Megatron: its main process and
workers; kiln: gigatoken's threads), timed wall clock from start to exit (imports, tokenizer
loading, reading, writing .bin/.idx and, for kiln, the manifest with the inputs' sha256), with peak
RSS summed over the process tree. kiln runs twice: backend auto (gigatoken) and tokenizers. Both
outputs are compared byte for byte with Megatron-LM's.

    python benchmarks/prepare.py [--mib 200] [--cores 2] [--megatron-lm PATH] [--work DIR]
                                 [--repeat 1] [--skip-tokenizers-backend]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import process_tree

ROOT = Path(__file__).resolve().parents[1]
MEGATRON_LM = "https://github.com/NVIDIA/Megatron-LM"
MEGATRON_COMMIT = "55ac7082517c3878ae653c07c09c534b8aed49f6"  # tag core_v0.16.1
DOC_BYTES = 16 << 10
SKIP_SUFFIXES = (".ps", ".eps", ".pdf", ".svg", ".json", ".log", ".amd64", ".png", ".gif", ".jpg")
SKIP_PREFIXES = ("test_results", "test-summary")


# ---- corpus and tokenizer ----

def _walk(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            yield Path(dirpath) / name


def documents():
    """Texts of the files under the roots, in a fixed order, cut into documents of <= 16 KiB."""
    for root in ("/usr/share/common-licenses", sysconfig.get_paths()["stdlib"], "/usr/share/doc"):
        for path in _walk(root):
            name = path.name.removesuffix(".gz")
            if path.is_symlink() or not path.is_file() or name.endswith(SKIP_SUFFIXES) or \
                    name.startswith(SKIP_PREFIXES) or path.suffix in (".pyc", ".so"):
                continue
            data = path.read_bytes()
            if path.name.endswith(".gz"):
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError):
                    continue
            if b"\0" in data:
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            while text:
                cut = len(text) if len(text) <= DOC_BYTES else (text.rfind("\n", 0, DOC_BYTES) + 1 or DOC_BYTES)
                piece, text = text[:cut], text[cut:]
                if piece.strip():
                    yield piece


def build_corpus(path: Path, mib: float) -> dict:
    target, size, count = int(mib * 2**20), 0, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for text in documents():
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            size, count = size + len(line.encode()), count + 1
            if size >= target:
                break
    if size < target:
        sys.exit(f"this machine has only {size / 2**20:.0f} MiB of text in the corpus roots; use --mib "
                 f"{int(size / 2**20)} or less")
    tmp.rename(path)
    return {"documents": count, "bytes": size}


def train_tokenizer(corpus: Path, out: Path, vocab: int) -> None:
    sys.path.insert(0, str(ROOT))
    from kiln.data import tokenizer as tok

    def head(limit=32 << 20):
        read = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                read += len(line)
                if read > limit:
                    return
                yield json.loads(line)["text"]

    tok.train_bpe(head(), vocab, out)


# ---- Megatron-LM ----

def megatron_checkout(source: str | None, work: Path) -> Path:
    """tools/ and megatron/ of the pinned commit, extracted under `work`."""
    dest = work / f"megatron-lm-{MEGATRON_COMMIT[:12]}"
    if (dest / "tools" / "preprocess_data.py").exists():
        return dest
    if source and (Path(source) / "tools" / "preprocess_data.py").exists() and not _git_dir(Path(source)):
        sys.exit(f"{source} is a Megatron-LM tree without git metadata: give a clone (or its git directory) that "
                 f"holds commit {MEGATRON_COMMIT}")
    git_dir = _git_dir(Path(source)) if source else None
    if git_dir is None:
        clone = work / "Megatron-LM.git"
        if not clone.exists():
            subprocess.run(["git", "clone", "--bare", "--filter=blob:none", MEGATRON_LM, str(clone)], check=True)
        git_dir = clone
    tmp = dest.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", MEGATRON_COMMIT, "tools", "megatron"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    tmp.rename(dest)
    return dest


def _git_dir(path: Path) -> Path | None:
    for candidate in (path / ".git", path):
        if (candidate / "HEAD").exists() and (candidate / "objects").exists():
            return candidate
    return None


def megatron_deps(work: Path) -> Path:
    """A directory with what megatron.training imports and this Python lacks (triton)."""
    deps = work / "megatron-deps"
    probe = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(deps)})
    if probe.returncode:
        print("installing triton (imported by megatron.training, unused by preprocess_data.py) into", deps)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(deps), "triton"],
                       check=True)
    return deps


# ---- measuring ----

def measure(command: list[str], cores: set[int], env: dict | None = None, log: Path | None = None) -> dict:
    """Wall seconds and peak RSS (GiB, the process and all its children) of `command` pinned to `cores`."""
    with open(log, "w") if log else contextlib.nullcontext(subprocess.DEVNULL) as out:
        code, seconds, peak = process_tree.run(command, ROOT, out, env, cores)
    if code:
        sys.exit(f"{' '.join(command)} failed{f': see {log}' if log else ''}")
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(peak, 2)}


def same_bytes(a: str, b: str) -> bool:
    def chunks(path):
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                yield block

    for suffix in (".bin", ".idx"):
        if os.path.getsize(a + suffix) != os.path.getsize(b + suffix):
            return False
        if any(x != y for x, y in zip(chunks(a + suffix), chunks(b + suffix), strict=True)):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=200.0, help="corpus size")
    parser.add_argument("--cores", type=int, default=2, help="CPUs every run is pinned to (Megatron: as many workers)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--megatron-lm", help="a Megatron-LM clone or git directory holding the pinned commit")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "kiln" / "bench-prepare"))
    parser.add_argument("--repeat", type=int, default=1, help="kiln runs (gigatoken) to take the fastest of")
    parser.add_argument("--skip-tokenizers-backend", action="store_true",
                        help="skip kiln's tokenizers-backend run (it takes about as long as Megatron-LM's)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cores = set(sorted(os.sched_getaffinity(0))[: args.cores])

    corpus = work / f"corpus-{args.mib:g}mib.jsonl"
    if not corpus.exists():
        tic = time.perf_counter()
        info = build_corpus(corpus, args.mib)
        print(f"corpus: {info['documents']} documents, {info['bytes'] / 2**20:.1f} MiB "
              f"({time.perf_counter() - tic:.0f} s to build) -> {corpus}")
    tokenizer = work / f"bpe-{args.vocab}"
    if not (tokenizer / "tokenizer.json").exists():
        tic = time.perf_counter()
        train_tokenizer(corpus, tokenizer.with_suffix(".tmp"), args.vocab)
        tokenizer.with_suffix(".tmp").rename(tokenizer)
        print(f"tokenizer: {args.vocab} byte-level BPE trained in {time.perf_counter() - tic:.0f} s -> {tokenizer}")
    checkout = megatron_checkout(args.megatron_lm, work)
    deps = megatron_deps(work)
    out = work / "out"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir()
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    print(f"corpus {corpus.stat().st_size / 2**20:.1f} MiB, cores {sorted(cores)}, Megatron-LM {MEGATRON_COMMIT[:12]}")

    results = {}
    results["megatron"] = measure(
        [sys.executable, str(checkout / "tools" / "preprocess_data.py"), "--input", str(corpus),
         "--output-prefix", str(out / "megatron"), "--tokenizer-type", "HuggingFaceTokenizer",
         "--tokenizer-model", str(tokenizer), "--append-eod", "--workers", str(args.cores)],
        cores, {**offline, "PYTHONPATH": f"{checkout}{os.pathsep}{deps}"}, work / "megatron.log")
    reference = str(out / "megatron_text_document")
    kiln = str(Path(sys.executable).parent / "kiln")
    results["kiln (gigatoken)"] = min(
        (measure([kiln, "prepare", "--input", str(corpus), "--output", str(out / "kiln-auto"),
                  "--tokenizer", str(tokenizer)], cores, offline, work / "kiln-auto.log")
         for _ in range(max(args.repeat, 1))), key=lambda r: r["seconds"])
    runs = {"kiln (gigatoken)": out / "kiln-auto"}
    if not args.skip_tokenizers_backend:
        code = ("import sys; from kiln.config import PrepareConfig; from kiln.data.prepare import prepare; "
                "prepare(PrepareConfig(inputs=[sys.argv[1]], output_dir=sys.argv[2], tokenizer=sys.argv[3]), "
                "backend='tokenizers')")
        results["kiln (tokenizers)"] = measure(
            [sys.executable, "-c", code, str(corpus), str(out / "kiln-tokenizers"), str(tokenizer)],
            cores, offline, work / "kiln-tokenizers.log")
        runs["kiln (tokenizers)"] = out / "kiln-tokenizers"

    sys.path.insert(0, str(ROOT))
    from kiln.data.indexed import read_counts

    tokens = read_counts(reference)["tokens"]
    base = results["megatron"]["seconds"]
    print(f"\n{tokens / 1e6:.1f}M tokens; wall clock per process, start to exit\n")
    print(f"{'':20}{'seconds':>9}{'tokens/s':>12}{'vs Megatron':>13}{'peak RSS':>10}  identical bytes")
    for name, r in results.items():
        r["tokens_per_second"] = round(tokens / r["seconds"])
        r["ratio"] = round(base / r["seconds"], 2)
        if name in runs:
            manifest = json.loads((runs[name] / "kiln.json").read_text())["summary"]
            r["identical"] = same_bytes(str(runs[name] / "corpus_text_document"), reference)
            r["backend"], r["prepare_seconds"] = manifest["backend"], manifest["seconds"]
        print(f"{name:20}{r['seconds']:9.2f}{r['tokens_per_second'] / 1e6:11.2f}M{r['ratio']:12.1f}x"
              f"{r['peak_rss_gib']:8.2f} GiB  {r.get('identical', '(reference)')}"
              + (f"  (in prepare(): {r['prepare_seconds']:.2f} s)" if "prepare_seconds" in r else ""))
    (work / "results.json").write_text(json.dumps({"tokens": tokens, "cores": sorted(cores), "corpus": str(corpus),
                                                   "megatron_commit": MEGATRON_COMMIT, **results}, indent=2) + "\n")
    if not all(r.get("identical", True) for r in results.values()):
        sys.exit("kiln's .bin/.idx differ from Megatron-LM's")


if __name__ == "__main__":
    main()
