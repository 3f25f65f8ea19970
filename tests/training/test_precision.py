"""bf16: every weight is cast (GPT-2's learned position embedding too), so the first layer gets a
bf16 hidden state, which TransformerEngine's fused layers require; logits come back in fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow  # launches processes (make test-fast skips it)


def probe(precision: str) -> dict:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "precision_probe.py"), precision],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_bf16_casts_the_whole_model_and_returns_fp32_logits():
    assert probe("bf16") == {"layer_input": "torch.bfloat16", "logits": "torch.float32",
                             "position_embedding": "torch.bfloat16"}
    assert probe("fp32")["layer_input"] == "torch.float32"
