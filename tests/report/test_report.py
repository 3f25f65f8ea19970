"""`kiln report` on a real small pipeline's outputs (curate -> prepare -> pretrain on two sources ->
eval against a baseline; tests/report/build_outputs.py), rendered by a real headless Chromium;
`kiln pipeline run` writing it; `kiln pipeline status --watch`; and the inputs it refuses."""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln import pipeline as pl
from kiln.artifact import read_manifest
from kiln.errors import ReportError
from kiln.launch.config import LaunchConfig
from kiln.launch.driver import launch_pipeline
from kiln.report import report_path, report_pipeline
from tests.conftest import ROOT
from tests.report import build_outputs

pytestmark = pytest.mark.slow  # the fixture trains and evaluates (about a minute and a half)

# every figure the page must hold for this pipeline, by id
FIGURES = {"loss-pretrain", "learning-rate", "throughput", "curation-funnel", "cluster-sizes", "tokens-per-source",
           "eval-scores"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report") / "pipe"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(Path(build_outputs.__file__)), str(root)], capture_output=True,
                          text=True, timeout=1200, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root


def pipeline(root: Path):
    return build_outputs.pipeline(root, root / "baseline_eval_summary.json")


@pytest.fixture(scope="module")
def page(root) -> Path:
    return report_pipeline(pipeline(root))


def images(index: Path) -> dict[str, bytes]:
    """id -> the PNG bytes inlined in the page."""
    import base64

    found = re.findall(r'<img id="fig-([\w-]+)" alt="[^"]*" src="data:image/png;base64,([^"]+)"', index.read_text())
    return {fid: base64.b64decode(data) for fid, data in found}


def test_the_page_holds_every_figure_inline_and_beside_it(page, root):
    assert page == root / "report" / "index.html"
    inline = images(page)
    assert set(inline) == FIGURES
    assert set(json.loads((page.parent / "report.json").read_text())["figures"]) == FIGURES
    for fid, data in inline.items():
        assert data.startswith(PNG), fid
        width, height = Image.open(io.BytesIO(data)).size
        assert width >= 600 and height >= 200, (fid, width, height)
        assert (page.parent / f"{fid}.png").read_bytes() == data  # the same figure as a file beside the page
    text = page.read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", text)  # nothing to fetch: it opens offline
    assert not list(root.glob("report.tmp-*"))  # written whole, renamed


def test_the_page_reads_what_the_stages_recorded(page, root):
    text = html.unescape(page.read_text())
    curation = json.loads((root / "curated" / "curation_report.json").read_text())
    # the corpus was made to lose documents at every step of the funnel, and near-duplicates in threes
    assert curation["filters"]["removed"] > 0 and curation["exact_dedup"]["removed"] > 0
    assert curation["fuzzy_dedup"]["removed"] > 0 and "3" in curation["fuzzy_dedup"]["cluster_sizes"]
    assert f"{curation['documents_in']} documents in, {curation['documents_out']} out" in text
    # per-source validation loss from metrics.jsonl, both sources of the blend
    records = [json.loads(line) for line in (root / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_loss/corpus", "val_loss/corpus_2"} <= set(records[0])
    assert "per source: corpus, corpus_2" in text
    # tokens per source: the indexed dataset's count, as prepare recorded it
    tokens = read_manifest(root / "data")["summary"]["tokens"]
    assert f"corpus: {tokens:,} tokens" in text and f"corpus_2: {tokens:,} tokens" in text
    # eval against the baseline the gate compared with
    assert "baseline_eval_summary.json" in text and "within tolerance" in text and "regressed</span>" not in text
    # every stage's row, with the digests its manifest recorded and the timing
    for stage in ("curate", "prepare", "pretrain", "eval"):
        assert f"<td>{stage}</td><td><span class=\"done\">done</span>" in text
    for record in read_manifest(root / "pretrain")["inputs"]:
        assert record["digest"][:16] in text


def test_the_page_renders_in_headless_chromium(page, tmp_path):
    # required, not skipped: .ci/run installs it beside Slurm, so CI always renders the page
    assert CHROMIUM, ("no chromium on PATH: `apt-get install -y --no-install-recommends chromium` (Debian; "
                      ".ci/run does) to render the report in a headless browser")
    def chromium(*args):
        # root in a container needs --no-sandbox; the dead proxy makes any network request fail
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--proxy-server=127.0.0.1:9", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)

    shot = tmp_path / "page.png"
    out = chromium(f"--screenshot={shot}", "--window-size=1200,2600", page.as_uri())
    assert shot.exists(), out.stderr[-3000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.std() > 20, "the screenshot is blank"
    blue = np.all(np.abs(pixels - [0x4C, 0x72, 0xB0]) < 12, axis=-1).mean()  # the figures' bars and lines
    assert blue > 0.002, f"hardly any figure drawn in the screenshot ({blue:.4%} of pixels)"

    # every image decoded in the browser: a copy of the page reports each one's natural size
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", (
        "<script>addEventListener('load', () => { const p = document.createElement('pre'); p.id = 'probe';"
        " p.textContent = JSON.stringify([...document.images].map(i => [i.id, i.naturalWidth, i.naturalHeight]));"
        " document.body.appendChild(p); });</script></body>")))
    dom = chromium("--dump-dom", "--virtual-time-budget=10000", probe.as_uri()).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    decoded = {fid.removeprefix("fig-"): (w, h) for fid, w, h in json.loads(html.unescape(found.group(1)))}
    assert set(decoded) == FIGURES
    assert all(w >= 600 and h >= 200 for w, h in decoded.values()), decoded


def test_a_stage_directory_and_a_pipeline_root(root, tmp_path):
    index = report_path(root / "pretrain")
    assert index == root / "pretrain-report" / "index.html"  # beside the run, never inside an artifact
    assert set(images(index)) == {"loss-pretrain", "learning-rate", "throughput", "tokens-per-source"}
    # the root of a pipeline: its stage directories, the moved-aside ones left out
    shutil.copytree(root / "data", tmp_path / "pipe" / "data")
    shutil.copytree(root / "data", tmp_path / "pipe" / "data.stale-20260101-000000")
    index = report_path(tmp_path / "pipe", output=tmp_path / "out")
    listing = json.loads((tmp_path / "out" / "report.json").read_text())
    assert listing["stages"] == {"prepare": str(tmp_path / "pipe" / "data")}
    assert listing["figures"] == ["tokens-per-source"] and index.exists()


def test_pipeline_run_writes_the_report_and_prints_where(root, tmp_path):
    lines = []
    assert launch_pipeline(pipeline(root), LaunchConfig(experiments_dir=str(tmp_path / "home")),
                           echo=lines.append) == 0
    assert lines[-1] == "every stage is fresh: nothing to run"
    assert lines[-2] == f"report: {root / 'report' / 'index.html'}"
    assert set(images(root / "report" / "index.html")) == FIGURES


def refused(call, *fragments: str) -> None:
    """`call` raises a ReportError whose message holds every fragment (paths, the fix)."""
    with pytest.raises(ReportError) as caught:
        call()
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


def test_a_run_directory_without_metrics(root, tmp_path):
    run = tmp_path / "pretrain"
    run.mkdir()
    shutil.copy(root / "pretrain" / "kiln.json", run)
    refused(lambda: report_path(run), f"{run} has no metrics.jsonl: a training stage writes it",
            "give a training run's run_dir")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    refused(lambda: report_path(run), f"{run}/metrics.jsonl:2: not a metrics record", "remove the line")
    assert not (tmp_path / "pretrain-report").exists()


def test_a_missing_stage(root, tmp_path):
    copy = tmp_path / "pipe"
    for name in ("curated", "data", "eval"):  # pretrain missing
        shutil.copytree(root / name, copy / name)
    p = build_outputs.pipeline(copy, root / "baseline_eval_summary.json")
    refused(lambda: report_pipeline(p), f"stage pretrain has not run ({copy}/pretrain holds no kiln.json)",
            "run `kiln pipeline run tiny`", "or report the stages that exist with --partial")
    assert not (copy / "report").exists()
    index = report_pipeline(p, partial=True)  # then it is listed as not run
    assert '<td>pretrain</td><td><span class="stale">not run</span>' in index.read_text()
    # a training run without its manifest yet (running, or stopped): its last step, and its curves so far
    (copy / "pretrain").mkdir()
    shutil.copy(root / "pretrain" / "metrics.jsonl", copy / "pretrain")
    assert "pretrain  in progress: step 6/6" in pl.status_table(p)
    index = report_pipeline(p, partial=True)
    assert '<span class="progress">in progress: step 6/6</span>' in index.read_text()
    assert "loss-pretrain" in images(index)
    refused(lambda: report_path(tmp_path / "nowhere"), f"{tmp_path}/nowhere does not exist: give a stage's directory")


def test_an_unwritable_output(root, tmp_path):
    (tmp_path / "file").write_text("x")
    refused(lambda: report_path(root / "data", output=tmp_path / "file" / "report"),
            f"cannot write the report to {tmp_path}/file/report: {tmp_path}/file is a file, not a directory",
            "choose another --output")
    # an existing directory that is no earlier report is never replaced (a report replaces its directory whole)
    refused(lambda: report_path(root / "data", output=root / "curated"),
            f"--output {root}/curated is a directory that is not a kiln report", "choose another --output")
    assert (root / "curated" / "kiln.json").exists()
    # a place no one may create anything in, root included
    refused(lambda: report_path(root / "data", output="/proc/kiln-report"),
            "cannot write the report to /proc/kiln-report: ", "choose a writable directory with --output")


def test_cli_report_and_its_errors(root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def kiln(*args):
        return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True,
                              timeout=300, env=env, cwd=ROOT)

    out = kiln("report", str(root / "eval"), "--output", str(tmp_path / "eval-page"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"report: {tmp_path / 'eval-page' / 'index.html'}"
    out = kiln("report", str(root / "prepare-nothing"))
    assert out.returncode == 2 and "prepare-nothing does not exist" in out.stderr


def test_status_watch_refreshes_until_every_stage_is_done(root):
    """A stage whose artifact appears while watching: each new state is printed (into a log; a
    terminal gets the table redrawn in place) until every stage is done."""
    from rich.console import Console

    aside = root.parent / "eval-aside"
    (root / "eval").rename(aside)
    threading.Timer(1.5, lambda: aside.rename(root / "eval")).start()
    for console in (Console(file=io.StringIO(), width=200), Console(file=io.StringIO(), width=200,
                                                                      force_terminal=True)):
        started = time.monotonic()
        assert pl.watch(pipeline(root), interval=0.3, console=console) == 0
        text = console.file.getvalue()
        if not console.is_terminal:
            assert time.monotonic() - started >= 1.2  # it waited for the stage
            tables = text.split("stage ")[1:]
            assert len(tables) == 2, text  # the state before, and after: printed once each
            assert "eval      not run" in tables[0] and "eval      done" in tables[1]
        else:  # the stage is done by now: drawn once, and no footer since nothing is left to wait for
            assert "eval      done" in text and "Ctrl-C" not in text


def test_status_watch_stops_on_ctrl_c(root):
    script = ("import sys; from pathlib import Path\n"
              "from tests.report.build_outputs import pipeline\n"
              "from kiln import pipeline as pl\n"
              "p = pipeline(Path(sys.argv[1])); p.pretrain.train.steps = 7  # a config never run: never done\n"
              "print('watching', flush=True); sys.exit(pl.watch(p, interval=0.2))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "watching"
    time.sleep(2)
    assert proc.poll() is None  # still watching
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "stale: config changed" in out and "Traceback" not in err
