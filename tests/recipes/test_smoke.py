"""CI smoke recipes: each stage's smoke run must reproduce its reference loss curve, so a change
that moves the numerics fails CI even when every parity check still agrees with itself."""

from __future__ import annotations

import pytest

from kiln.recipes.pretrain import smoke
from tests.conftest import check_loss_curve, launch, read_metrics

pytestmark = pytest.mark.slow  # launches processes (make test-fast skips it)

TOLERANCE = 2e-3  # fp32 on CPU; covers BLAS differences between x86 CPUs, not a changed model


def test_pretrain_smoke_matches_reference_curve(demo_data, tmp_path):
    cfg = smoke()
    fields = {
        "run_dir": str(tmp_path / "smoke"),
        "data.blend": f"[{demo_data}/corpus_text_document]",
        "data.tokenizer": str(demo_data / "tokenizer"),
        "data.cache_dir": str(tmp_path / "cache"),
        "logging.tensorboard": "false",
        "logging.progress_bar": "false",
    }
    launch(cfg.parallel.world_size, [[f"{k}={v}" for k, v in fields.items()]], recipe="smoke")
    metrics = read_metrics(tmp_path / "smoke")
    assert metrics[20]["loss"] < metrics[1]["loss"] - 2.0
    check_loss_curve("pretrain_smoke", metrics, TOLERANCE)
