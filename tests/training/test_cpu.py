"""kiln.training.cpu redirects exactly megatron-core's CUDA calls, and nothing else."""

from __future__ import annotations

import importlib

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU redirect is off on GPU machines")


@pytest.fixture(scope="module")
def cpu():
    from kiln.training import cpu

    cpu.enable()
    cpu.enable()  # idempotent
    return cpu


def test_redirected_modules_allocate_cuda_tensors_on_cpu(cpu):
    for name in cpu._REDIRECTED:
        module = importlib.import_module(name)
        t = module.torch.zeros(2, device="cuda")
        assert t.device.type == "cpu", name
        assert module.torch.cuda.current_device() == torch.device("cpu")


def test_global_torch_is_untouched(cpu):
    assert not torch.cuda.is_available()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_parameter_type_names_cuda_only_without_arguments(cpu):
    p = torch.nn.Parameter(torch.zeros(2))
    assert p.type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2).type() == "torch.FloatTensor"
    assert p.type(torch.float64).dtype == torch.float64


def test_rng_tracker_forks_and_restores_cpu_state(cpu):
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    torch.manual_seed(0)
    tracker.add("stream", 123)
    before = torch.get_rng_state()
    with tracker.fork("stream"):
        forked = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the outer stream continues untouched
    torch.manual_seed(123)
    assert torch.equal(forked, torch.rand(3))  # the fork drew from its own seeded stream


def test_grad_clipping_scales_in_place(cpu):
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    cpu._clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-6)
