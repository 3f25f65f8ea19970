"""What a mixture-of-experts model reports per step: its routers' auxiliary losses and how many
tokens each expert received.

The auxiliary losses come from megatron-core's own tracker (moe_utils), which each router fills
per layer and microbatch and which megatron-core reduces over PP, the router's TP group and DP.
Expert load is not tracked by megatron-core: a forward hook on every router counts its routing
map (token-to-expert assignments after any capacity drop) for this rank's tokens.
"""

from __future__ import annotations

import torch

from kiln.config import ModelConfig


class MoEMonitor:
    """Collective: every rank builds one and calls `reset` and `collect` around each train step."""

    def __init__(self, chunks, model: ModelConfig, device: torch.device):
        from megatron.core.transformer.moe.moe_layer import MoELayer

        from kiln.training.model import gpt_of

        self.routers = {}  # global layer index -> router
        for chunk in chunks:
            for layer in gpt_of(chunk).decoder.layers:
                if isinstance(layer.mlp, MoELayer):
                    self.routers[layer.layer_number - 1] = layer.mlp.router
        experts = model.moe.num_experts
        # every rank keeps every layer's row (zeros for other stages' layers), so one all-reduce sums them
        self.tokens = torch.zeros(model.num_layers, experts, dtype=torch.float64, device=device)
        self.moe_layers = [i for i in range(model.num_layers) if model.moe.is_moe_layer(i)]
        for index, router in self.routers.items():
            router.register_forward_hook(self._counter(index))

    def _counter(self, index: int):
        def count(_router, _inputs, output):
            _probs, routing_map = output
            self.tokens[index] += routing_map.detach().sum(dim=0).to(self.tokens)

        return count

    def reset(self) -> None:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        self.tokens.zero_()
        clear_aux_losses_tracker()

    def collect(self, num_microbatches: int) -> dict:
        """The step's MoE record: per-loss means over MoE layers (in the log line), and per layer
        the losses and every expert's token count (metrics.jsonl, TensorBoard)."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
            reduce_aux_losses_tracker_across_ranks,
        )

        # ranks of a stage hold disjoint tokens (DP, EP, and TP under sequence parallelism, which
        # MoE with TP requires) and stages hold disjoint layers: the world's sum is every count once
        torch.distributed.all_reduce(self.tokens)
        tracker = get_moe_layer_wise_logging_tracker()
        names = sorted(tracker)
        reduce_aux_losses_tracker_across_ranks(names)
        # a loss megatron-core logs without a reduce group (z-loss) is this rank's tokens' mean:
        # average it over the stage's TP x DP ranks, whose token shares are equal
        stage = ps.get_tensor_and_data_parallel_group()
        for name in names:
            if tracker[name].get("reduce_group") is None and tracker[name].get("avg_group") is None:
                torch.distributed.all_reduce(tracker[name]["values"], group=stage)
                tracker[name]["values"] /= torch.distributed.get_world_size(stage)
        record: dict = {}
        for name in names:
            values = tracker[name]["values"].double() / num_microbatches
            per_layer = {str(i): values[i].item() for i in self.moe_layers}
            record[f"moe_{name}"] = sum(per_layer.values()) / len(per_layer)
            record[f"moe_{name}_per_layer"] = per_layer
        clear_aux_losses_tracker()
        loads = {i: self.tokens[i] for i in self.moe_layers}
        record["expert_imbalance"] = max((t.max() / t.mean().clamp(min=1e-9)).item() for t in loads.values())
        record["expert_tokens"] = {str(i): [int(v) for v in t.tolist()] for i, t in loads.items()}
        return record
