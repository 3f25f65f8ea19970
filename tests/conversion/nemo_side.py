"""NeMo 2.7.3's own importer, exporter and `load_context`, run on CPU in the separate NeMo
environment (`make nemo-env`), for kiln's interop tests. Not importable from kiln's venv.

    .venv-nemo/bin/python tests/conversion/nemo_side.py '["import", "HF_DIR", "OUT"]' '["export", "NEMO2", "HF_OUT"]'

Commands: tiny-hf FAMILY OUT [JSON] (a random 2-layer model saved by NeMo's transformers), import HF OUT
(`llm.import_ckpt`), export NEMO2 HF_OUT (`llm.export_ckpt`), context NEMO2 OUT_JSON (`load_context`).

NeMo needs a GPU and TransformerEngine for these calls; the stand-ins below let it run on CPU and
change no tensor value (none runs a forward pass):
- TE's fused norm+linear modules (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`):
  NeMo's Llama/Mistral/Qwen2 mappings name them, and with megatron-core's local spec its importer
  finds no match and leaves the norms at their init. A module with TE's parameter names takes their
  place, so NeMo converts exactly what it converts on a GPU.
- megatron-core refuses `apply_rope_fusion` (NeMo's Llama default) without TE's kernel: a kernel that
  raises if called is registered; nothing here calls it.
- megatron's torch norm refuses `persist_layer_norm` (a TE kernel choice): TENorm's place is taken by
  torch's norm.
- CUDA calls NeMo's checkpoint path makes (`synchronize`, streams) become no-ops on CPU.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch


def _cpu_stand_ins() -> None:
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.identity_op import IdentityOp

    def fused_rope_unavailable(*args, **kwargs):
        raise RuntimeError("fused RoPE needs TransformerEngine (a CPU stand-in; never called by conversion)")

    rope_utils.fused_apply_rotary_pos_emb = fused_rope_unavailable

    class NormColumnParallelLinear(ColumnParallelLinear):
        """TELayerNormColumnParallelLinear's parameters on CPU: the norm's weight lives on the linear."""

        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))
            if config.normalization == "LayerNorm":
                self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size))

    local_spec = gpt_layer_specs.get_gpt_layer_local_spec

    def te_named_spec(*args, **kwargs):
        spec = local_spec(*args, **kwargs)
        layer = spec.submodules
        layer.input_layernorm = IdentityOp
        layer.pre_mlp_layernorm = IdentityOp
        layer.self_attention.submodules.linear_qkv = NormColumnParallelLinear
        layer.mlp.submodules.linear_fc1 = NormColumnParallelLinear
        return spec

    gpt_layer_specs.get_gpt_layer_local_spec = te_named_spec

    class FinalNorm:
        """TENorm's CPU stand-in (megatron's torch norm refuses persist_layer_norm, a TE kernel choice)."""

        def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
            norm = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
            return norm(hidden_size, eps=eps)

    transformer_block.LayerNormImpl = FinalNorm
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"  # the async checkpoint writer's all-reduce of "done" flags
    torch.cuda.Stream = lambda *a, **k: None  # NeMo wraps its model-parallel setup in a side stream
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    from nemo.lightning.io import pl

    pl._fix_tensors_device = lambda checkpoint: checkpoint  # moves loaded tensors to the current GPU


def tiny_hf(family: str, out: str, extra: str = "{}") -> None:
    """A 2-layer model of `family` with random weights (norms and biases too), saved by NeMo's
    transformers; `extra`: config fields as JSON."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["the kiln fires the clay"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tokenizer.get_vocab_size()  # NeMo's exporter sizes the HF vocabulary by the tokenizer
    shape = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    settings = {
        # NeMo's importer reads only `factor` of llama3 RoPE scaling (the rest stay at Llama 3.1's values)
        "llama": dict(rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}),
        "qwen2": dict(rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
        "mistral": dict(rope_theta=1000000.0, sliding_window=None),
    }[family] | json.loads(extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**shape, **settings}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(out)


def run(command: str, source: str, *rest: str) -> None:
    from nemo.collections import llm

    if command == "tiny-hf":
        tiny_hf(source, *rest)
    elif command == "import":
        from transformers import AutoConfig

        # the importer builds its config from config.json; the model given only picks the importer
        model_class = {"llama": llm.LlamaModel, "mistral": llm.MistralModel, "qwen2": llm.Qwen2Model}[
            AutoConfig.from_pretrained(source).model_type]
        template = llm.GPTConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
        llm.import_ckpt(model=model_class(template), source=f"hf://{source}", output_path=rest[0])
    elif command == "export":
        llm.export_ckpt(path=source, target="hf", output_path=rest[0])
    elif command == "context":  # the model config NeMo rebuilds from io.json, as JSON
        from nemo.lightning.io import load_context

        config = load_context(source, subpath="model").config
        fields = {k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool, type(None)))}
        fields.update(config_class=type(config).__name__, activation_func=config.activation_func.__name__,
                      params_dtype=str(config.params_dtype))
        Path(rest[0]).write_text(json.dumps(fields))
    else:
        raise SystemExit(f"unknown command {command!r}")


def main(argv: list[str]) -> None:
    """Each argument is one command as a JSON list, run in order in this one process (NeMo's
    import costs ~25 s per process)."""
    _cpu_stand_ins()
    for command in argv:
        run(*json.loads(command))


if __name__ == "__main__":  # NeMo's checkpoint writer starts a child that re-imports __main__
    main(sys.argv[1:])
