"""`make gpu-check` itself, in its CPU form: the checks that have one run through the real kiln
command (fp32, local layer spec), the GPU-only ones report SKIP, and the table comes out."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_runs_its_cpu_form_and_skips_what_needs_a_gpu(tmp_path):
    # the SFT checks' CPU forms are the post-training tests' runs; tp2's the parity tests'
    checks = "environment,pretrain,converted,curator_gpu,trtllm"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu", "--steps", "3",
                          "--only", checks, "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    table = out.stdout.split("\n\ncheck")[1]
    status = {line.split()[0]: line.split()[1] for line in table.splitlines()[1:] if line.strip() and
              not line.startswith("runs kept")}
    assert status == {"environment": "PASS", "pretrain": "PASS", "converted": "PASS", "curator_gpu": "SKIP",
                      "trtllm": "SKIP"}, table
