"""LoRA's handling of TransformerEngine layers, checked where TE cannot run: the forward hook's
reading of TE's outputs and the adapter sizes TE's per-partition features give. The TE layers
themselves run in `make gpu-check` (LoRA on TE layers, against a merged checkpoint)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kiln.alignment.lora import _hook, _sizes


class Adapter:
    merged = False

    def __call__(self, x):
        self.seen = x
        return 10 * x


def test_a_fused_norm_layer_feeds_the_adapter_its_normalized_input():
    adapter, x, normed, out = Adapter(), torch.ones(2, 3), torch.full((2, 3), 2.0), torch.zeros(2, 3)
    hook = _hook(adapter, after_norm=True)
    result, bias = hook(None, (x,), ((out, normed), None))  # TE LayerNormLinear(return_layernorm_output)
    assert adapter.seen is normed and torch.equal(result, 10 * normed) and bias is None
    b = torch.ones(3)
    result, bias = hook(None, (x,), (out, b, normed))  # ... returning its bias separately
    assert torch.equal(result, 10 * normed) and bias is b
    adapter.merged = True  # folded into the weight: the layer's own output, in megatron's (out, bias) form
    assert hook(None, (x,), ((out, normed), None)) == (out, None)


def test_a_plain_layer_feeds_the_adapter_its_input():
    adapter, x, out = Adapter(), torch.ones(2, 3), torch.zeros(2, 3)
    result, _ = _hook(adapter, after_norm=False)(None, (x,), (out, None))
    assert adapter.seen is x and torch.equal(result, 10 * x)


def test_adapter_sizes_from_megatron_and_te_layers():
    megatron_column = SimpleNamespace(input_size=64, output_size_per_partition=96, output_size=192)
    assert _sizes(megatron_column, "column", tp=2) == (64, 96)
    assert _sizes(SimpleNamespace(input_size=128, output_size_per_partition=32, output_size=64), "row", 2) == (128, 64)
    # TE counts the features it splits per partition: a column layer's outputs, a row layer's inputs
    assert _sizes(SimpleNamespace(in_features=64, out_features=96), "column", tp=2) == (64, 96)
    assert _sizes(SimpleNamespace(in_features=64, out_features=64), "row", tp=2) == (128, 64)
