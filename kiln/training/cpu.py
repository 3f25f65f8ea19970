"""Runs megatron-core 0.16.1 on CPU, over gloo, by redirecting its hard-coded CUDA calls.

megatron-core assumes a GPU in a handful of places. Rather than patching torch for
the whole process, each affected megatron-core module gets its own view of `torch`
(`_CpuTorch`) in which `device="cuda"` means the CPU and the few `torch.cuda`
functions it calls act on the CPU. Everything else is megatron-core's own code,
so TP/PP/DP, the distributed optimizer and dist-checkpointing run their real paths.

`enable()` is called by the engine only when CUDA is absent; it is idempotent.
Each entry of `_REDIRECTED` names the megatron-core module and what it needs.
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

# megatron-core module -> why it needs a CPU view of torch
_REDIRECTED = {
    "megatron.core.tensor_parallel.random":
        "the RNG tracker seeds and forks CUDA generator state (model-parallel seeds, dropout)",
    "megatron.core.tensor_parallel.layers":
        "parallel linear layers allocate gather buffers on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.mappings":
        "TP all-gather / reduce-scatter outputs on torch.cuda.current_device()",
    "megatron.core.transformer.utils": 'causal attention masks built with device="cuda"',
    "megatron.core.models.common.embeddings.rotary_pos_embedding":
        "RoPE frequencies moved to torch.cuda.current_device()",
    "megatron.core.utils": "the global memory buffer and grad-norm scalars on 'cuda'",
    "megatron.core.distributed.param_and_grad_buffer":
        "DDP's contiguous param/grad buffers on torch.cuda.current_device()",
    "megatron.core.pipeline_parallel.schedules": 'per-schedule token counters on device="cuda"',
    "megatron.core.pipeline_parallel.p2p_communication":
        "receive buffers for stage-to-stage sends on torch.cuda.current_device()",
    "megatron.core.transformer.attention": "the generation KV cache allocated on torch.cuda.current_device()",
    "megatron.core.optimizer.optimizer": "found-inf and overflow flags on device='cuda'",
    "megatron.core.optimizer.clip_grads": 'grad-norm reduction tensors on device="cuda"',
    "megatron.core.dist_checkpointing.strategies.filesystem_async":
        "torch.cuda.synchronize() before writing shards",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver":
        "save-plan agreement flags all-reduced on device='cuda'",
    # mixture of experts
    "megatron.core.transformer.moe.router": "router buffers on torch.cuda.current_device()",
    "megatron.core.transformer.moe.experts": "expert weights allocated on torch.cuda.current_device()",
    "megatron.core.transformer.moe.moe_utils": 'aux-loss tracker values on device="cuda"',
    "megatron.core.transformer.moe.token_dispatcher":
        "the alltoall dispatcher copies split sizes on a torch.cuda.Stream and waits on its event",
}

_enabled = False


def _cpu_device(device):
    """Map any CUDA device spec to the CPU; leave everything else alone."""
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CpuCuda(types.SimpleNamespace):
    """The subset of `torch.cuda` megatron-core calls, acting on the CPU."""

    def __getattr__(self, name):  # anything not redirected behaves as torch.cuda does
        return getattr(torch.cuda, name)


class _CpuStream:
    """A CUDA stream on the CPU, where every operation has finished when it returns: waiting and
    synchronizing are no-ops and an event is always complete."""

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        return types.SimpleNamespace(synchronize=lambda: None, wait=lambda stream=None: None,
                                     query=lambda: True)

    def synchronize(self) -> None:
        pass


_CURRENT_STREAM = _CpuStream()


def _cpu_cuda() -> _CpuCuda:
    return _CpuCuda(
        current_device=lambda: torch.device("cpu"),
        get_rng_state=lambda device=None: torch.get_rng_state(),
        set_rng_state=lambda state, device=None: torch.set_rng_state(state),
        manual_seed=torch.manual_seed,
        synchronize=lambda device=None: None,
        Stream=lambda *args, **kwargs: _CpuStream(),
        current_stream=lambda device=None: _CURRENT_STREAM,
        stream=lambda stream: contextlib.nullcontext(),
    )


def _split_sizes(sizes):
    """gloo's all_to_all_single takes split sizes as a list; the MoE dispatchers pass tensors or
    numpy arrays (on GPU they are copied to the host for NCCL, which takes either)."""
    return sizes.tolist() if hasattr(sizes, "tolist") else sizes


class _CpuDistributed(types.SimpleNamespace):
    """`torch.distributed` as megatron-core's redirected modules see it: the same, except for
    the forms gloo lacks, which the MoE token dispatchers use: all_to_all_single's split sizes as
    tensors; ReduceOp.AVG (the aux-loss tracker averages over DP), done as a sum divided by the
    group size; and all_gather / reduce_scatter of unequal pieces (the alltoall dispatcher under
    expert TP), done on pieces padded to the largest / on the whole tensor."""

    def __getattr__(self, name):
        return getattr(torch.distributed, name)


def _cpu_distributed() -> _CpuDistributed:
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        return torch.distributed.all_to_all_single(output, input, _split_sizes(output_split_sizes),
                                                   _split_sizes(input_split_sizes), **kwargs)

    def all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        if op != torch.distributed.ReduceOp.AVG:
            return torch.distributed.all_reduce(tensor, op=op, group=group, async_op=async_op)
        torch.distributed.all_reduce(tensor, group=group)
        tensor.div_(torch.distributed.get_world_size(group))
        return None

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if len({t.shape for t in tensor_list}) == 1:
            return torch.distributed.all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        torch.distributed.all_gather(gathered, padded, group=group)
        for out, piece in zip(tensor_list, gathered, strict=True):
            out.copy_(piece[: out.shape[0]])
        return None

    def reduce_scatter(output, input_list, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        whole = torch.cat([t.reshape(t.shape[0], -1) for t in input_list])
        torch.distributed.all_reduce(whole, op=op, group=group)
        rank = torch.distributed.get_group_rank(group, torch.distributed.get_rank()) if group else \
            torch.distributed.get_rank()
        start = sum(t.shape[0] for t in input_list[:rank])
        output.copy_(whole[start:start + output.shape[0]].reshape(output.shape))
        return None

    return _CpuDistributed(all_to_all_single=all_to_all_single, all_reduce=all_reduce, all_gather=all_gather,
                           reduce_scatter=reduce_scatter)


def _with_cpu_device(fn):
    def call(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    call.__wrapped__ = fn
    return call


_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")


class _CpuTorch(types.ModuleType):
    """`torch` as seen by one megatron-core module: CUDA devices and calls go to the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _cpu_cuda()
        self.distributed = _cpu_distributed()
        for name in _FACTORIES:
            setattr(self, name, _with_cpu_device(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _patch_rng_helpers(random_mod) -> None:
    """The tracker's private CUDA-state helpers become CPU generator state get/set."""
    random_mod._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    random_mod._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(
        new_state
    )


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip_grad_by_total_norm_fp32 asserts `grad.type() == 'torch.cuda.FloatTensor'`
    (megatron/core/optimizer/clip_grads.py); this is the same in-place scaling without that check."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                grad.detach().mul_(clip_coeff)


def _patch_tensor_methods() -> None:
    """Two tensor methods megatron-core relies on that cannot be scoped to a module.

    - `Tensor.cuda()` moves the tied output embedding before its first all-reduce
      (megatron/core/models/common/language_module/language_module.py). On a build
      without CUDA it can only raise, so it becomes "stay where you are".
    - `Parameter.type()` must name a CUDA type: the optimizers sort parameters into
      fp32 and fp16/bf16 groups by comparing it with 'torch.cuda.FloatTensor'
      (megatron/core/optimizer/optimizer.py, distrib_optimizer.py). Only the no-argument
      form on Parameters changes; casting with `.type(dtype)` is untouched.
    """
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    original_type = torch.Tensor.type

    def parameter_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            return original_type(self).replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.nn.Parameter.type = parameter_type


def enable() -> None:
    """Redirect megatron-core's CUDA calls to the CPU. Only call this when CUDA is absent."""
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("kiln.training.cpu.enable() is for machines without CUDA")
    cpu_torch = _CpuTorch()
    for name in _REDIRECTED:
        module = importlib.import_module(name)
        module.torch = cpu_torch
    _patch_rng_helpers(importlib.import_module("megatron.core.tensor_parallel.random"))
    # the router's gating linear tests `te_general_gemm is not None`, but moe_utils binds the
    # name only when TransformerEngine imports (NameError otherwise); None selects torch's matmul
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _patch_tensor_methods()
    importlib.import_module("megatron.core.optimizer.optimizer").clip_grad_by_total_norm_fp32 = (
        _clip_grad_by_total_norm_fp32
    )
    _enabled = True


def enabled() -> bool:
    return _enabled
