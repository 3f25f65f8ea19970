"""Builds kiln's model in a precision and reports the dtype of what reaches the first
transformer layer and what leaves the model (one process, gloo). Usage: precision_probe.py PRECISION"""

import json
import sys

import torch


def main() -> None:
    from kiln.bootstrap import quiet_library_warnings
    from kiln.config import ParallelConfig
    from kiln.recipes.models import gpt2
    from kiln.training import cpu
    from kiln.training.distributed import init_model_parallel, init_process_group, process_env
    from kiln.training.model import build_model, gpt_of

    quiet_library_warnings()
    cpu.enable()
    device = init_process_group(process_env())
    parallel = ParallelConfig()
    init_model_parallel(parallel, 1234)
    model = gpt2(2, 64, 4, vocab_size=256, max_position_embeddings=32)  # learned absolute positions
    chunks, _ = build_model(model, parallel, sys.argv[1], device, False)
    seen = {}
    gpt = gpt_of(chunks[0])

    def record(_module, args, kwargs):
        seen["layer_input"] = (args[0] if args else kwargs["hidden_states"]).dtype

    gpt.decoder.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    tokens = torch.randint(0, 256, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    logits = chunks[0](tokens, positions, None)
    print(json.dumps({"layer_input": str(seen["layer_input"]), "logits": str(logits.dtype),
                      "position_embedding": str(gpt.embedding.position_embeddings.weight.dtype)}))


if __name__ == "__main__":
    main()
