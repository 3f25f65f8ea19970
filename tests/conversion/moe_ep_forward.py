"""Run under torchrun: load a converted MoE checkpoint into kiln's engine with megatron-core's own
dist-checkpointing (every key the model names is present, and the checkpoint holds nothing else), at the
expert-parallel size given, and save rank 0's logits on sample tokens; each checkpoint in turn.

    torchrun --nproc-per-node 2 moe_ep_forward.py <ep> <checkpoint> <out.pt> [<checkpoint> <out.pt> ...]
"""

from __future__ import annotations

import sys

import torch


def main(ep: int, jobs: list[tuple[str, str]]) -> None:
    from kiln.config import ParallelConfig
    from kiln.training import cpu, distributed

    cpu.enable()
    torch.distributed.init_process_group("gloo")
    parallel = ParallelConfig(ep=ep, moe_dispatcher="allgather")
    distributed.init_model_parallel(parallel, seed=0)
    for path, out in jobs:
        forward(path, parallel, out)
    distributed.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def forward(path: str, parallel, out: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from kiln import overrides
    from kiln.artifact import resolve_checkpoint
    from kiln.config import ModelConfig
    from kiln.conversion.megatron import open_checkpoint
    from kiln.conversion.verify import sample_tokens
    from kiln.training.model import build_gpt, transformer_config

    _, common = open_checkpoint(path)
    m = overrides.from_dict(ModelConfig, common["kiln"]["model"])
    model = build_gpt(m, parallel, transformer_config(m, parallel, "fp32"))
    loaded, absent, unexpected = dist_checkpointing.load(model.sharded_state_dict(), str(resolve_checkpoint(path)),
                                                          strict=StrictHandling.RETURN_ALL)
    # `absent`: saved but not in this model; the final norm's TransformerEngine state is written for the
    # GPU spec, the local spec has none. `unexpected`: in this model but not saved
    assert not unexpected and absent <= {"decoder.final_layernorm._extra_state"}, (unexpected, absent)
    loaded.pop("kiln")  # common.pt: the config read above
    model.load_state_dict(loaded)
    model.eval()
    tokens = sample_tokens(m.vocab_size)
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., : m.vocab_size]
    if torch.distributed.get_rank() == 0:
        torch.save(logits.float(), out)


if __name__ == "__main__":
    main(int(sys.argv[1]), list(zip(sys.argv[2::2], sys.argv[3::2], strict=True)))
