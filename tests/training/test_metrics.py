"""Loss and gradient checks, and the FLOP count behind TFLOP/s."""

from __future__ import annotations

import logging
import math

import pytest

from kiln.config import LoggingConfig
from kiln.recipes import models
from kiln.training.metrics import Divergence, MetricsLogger, flops_per_token


@pytest.mark.parametrize("loss, grad_norm", [(math.nan, 1.0), (math.inf, 1.0), (2.0, math.nan)])
def test_non_finite_values_stop_the_run(loss, grad_norm):
    logger = MetricsLogger("unused", LoggingConfig(), 10, enabled=False)
    with pytest.raises(Divergence, match="step 3"):
        logger.check(3, loss, grad_norm)


def test_loss_spike_is_a_warning_not_a_stop(tmp_path, caplog):
    logger = MetricsLogger(str(tmp_path), LoggingConfig(tensorboard=False, progress_bar=False), 10, True)
    for step, loss in enumerate([2.0, 2.1, 1.9], 1):
        logger.check(step, loss, 1.0)
    with caplog.at_level(logging.WARNING, logger="kiln.train"):
        logger.check(4, 9.0, 1.0)
    logger.close()
    assert "loss spike 9.0000 > 3.0 x running mean 2.0000" in caplog.text


def test_flops_match_the_6n_rule_for_gpt2():
    """Training FLOPs per token are 6 x matmul parameters plus the attention term (PaLM
    appendix B); the embedding is a lookup, the output projection a matmul."""
    m = models.gpt2_124m()
    params = 12 * 12 * 768**2 + 768 * 50304  # layers (12h^2 each) + output projection
    expected = 6 * params + 12 * 12 * 768 * 1024
    assert flops_per_token(m, 1024, 50304) == pytest.approx(expected, rel=1e-9)
