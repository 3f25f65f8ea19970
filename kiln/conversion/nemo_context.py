"""NeMo 2's `context/`: the model as NeMo rebuilds it, written by kiln and read back.

NeMo's `load_context` (and so `llm.export_ckpt`, `llm.finetune(resume=...)`, NeMo-RL) rebuilds a
checkpoint's model from `context/io.json`, fiddle's JSON serialization of a TrainerContext
(`nemo.lightning.io.pl.TrainerContext`: model, trainer, extra). `context/model.yaml` is the same
model for people. fiddle's own serializer imports every class it names, and NeMo cannot be
installed beside kiln's pins, so kiln writes fiddle's JSON format (version 0.0.1) itself: a few
Config objects with their traverser metadata, each object carrying the `<root>...` paths
NeMo's `load_context(subpath=...)` looks objects up by. NeMo 2.7.3 reads it in
tests/conversion/test_nemo_interop.py.

Reading: a NeMo-written checkpoint's model config comes from `context/model.yaml`; a field
NeMo sets that kiln's engine does not model (a sliding window, QK norm, experts...) is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kiln.config import ModelConfig, RopeScaling
from kiln.errors import NemoFormatError

TOKENIZER_DIR = "nemo_tokenizer"  # NeMo resolves it against context/
LLM = "nemo.collections.llm.gpt.model"
# HF model_type -> NeMo's model and config classes (what NeMo's own importer builds)
CLASSES = {
    "llama": (f"{LLM}.llama.LlamaModel", f"{LLM}.llama.LlamaConfig"),
    "mistral": (f"{LLM}.mistral.MistralModel", f"{LLM}.mistral.MistralConfig7B"),
    "qwen2": (f"{LLM}.qwen2.Qwen2Model", f"{LLM}.qwen2.Qwen2Config"),
    "gpt2": (f"{LLM}.base.GPTModel", f"{LLM}.base.GPTConfig"),
}
LLAMA31_CONFIG = f"{LLM}.llama.Llama31Config"
DTYPES = {"float32": "torch.float32", "bfloat16": "torch.bfloat16", "float16": "torch.float16"}


@dataclass
class Call:
    """A fiddle Config of `target` with keyword arguments."""

    target: str
    kwargs: dict = field(default_factory=dict)


@dataclass
class Ref:
    """A Python symbol by its dotted name (a function, a dtype, a class)."""

    target: str


def nemo_divisor(vocab: int) -> int:
    """NeMo's importer: the largest power of two up to 128 that divides the vocabulary (so no padding)."""
    base = 128
    while vocab % base:
        base //= 2
    return base


def config_call(m: ModelConfig, model_type: str, vocab_rows: int, dtype: str) -> Call:
    """NeMo's config class for this model with every field that sets the math."""
    # GPT-2's tanh GELU as megatron-core's own function (fiddle cannot build a partial of a builtin)
    activation = {"swiglu": Ref("torch.nn.functional.silu"), "gelu": Ref("torch.nn.functional.gelu"),
                  "gelu_tanh": Ref("megatron.core.transformer.utils.openai_gelu")}
    kwargs = {
        "num_layers": m.num_layers, "hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn_size,
        "num_attention_heads": m.num_attention_heads, "num_query_groups": m.heads_kv, "kv_channels": m.head_dim,
        "seq_length": m.max_position_embeddings, "vocab_size": vocab_rows,
        "make_vocab_size_divisible_by": nemo_divisor(vocab_rows),
        "normalization": m.normalization, "layernorm_epsilon": m.norm_epsilon,
        "gated_linear_unit": m.activation == "swiglu", "activation_func": activation[m.activation],
        "position_embedding_type": m.position_embedding, "rotary_base": float(m.rotary_base),
        "rotary_percent": m.rotary_percent, "share_embeddings_and_output_weights": m.tie_embeddings,
        "add_bias_linear": m.add_bias_linear, "add_qkv_bias": m.add_qkv_bias,
        "init_method_std": m.init_method_std, "hidden_dropout": m.hidden_dropout,
        "attention_dropout": m.attention_dropout, "window_size": None,
        "params_dtype": Ref(DTYPES[dtype]), "bf16": dtype == "bfloat16", "fp16": dtype == "float16",
    }
    target = CLASSES[model_type][1]
    if m.rope_scaling is not None:
        target = LLAMA31_CONFIG
        s = m.rope_scaling
        kwargs.update(scale_factor=s.factor, low_freq_factor=s.low_freq_factor,
                      high_freq_factor=s.high_freq_factor, old_context_len=s.original_max_position_embeddings)
    return Call(target, kwargs)


def trainer_context(m: ModelConfig, model_type: str, vocab_rows: int, dtype: str, tokenizer: bool) -> Call:
    """`tokenizer`: whether context/nemo_tokenizer holds one (NeMo's exporters need it; load_context does not)."""
    model = Call(CLASSES[model_type][0], {"config": config_call(m, model_type, vocab_rows, dtype)})
    if tokenizer:
        model.kwargs["tokenizer"] = Call("nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
                                         {"pretrained_model_name": TOKENIZER_DIR})
    trainer = Call("nemo.lightning.pytorch.trainer.Trainer", {
        "accelerator": "cpu", "devices": 1,
        "strategy": Call("nemo.lightning.pytorch.strategies.megatron_strategy.MegatronStrategy",
                         {"ckpt_save_optimizer": False}),
    })
    return Call("nemo.lightning.io.pl.TrainerContext", {"model": model, "trainer": trainer, "extra": {}})


def write_context(context: Path, m: ModelConfig, model_type: str, vocab_rows: int, dtype: str) -> None:
    """`io.json` and `model.yaml` into `context` (the tokenizer, in TOKENIZER_DIR, is the caller's)."""
    root = trainer_context(m, model_type, vocab_rows, dtype, (context / TOKENIZER_DIR / "tokenizer.json").exists())
    (context / "io.json").write_text(json.dumps(_FiddleJSON().document(root), indent=2))
    (context / "model.yaml").write_text(yaml.safe_dump(_yaml(root.kwargs["model"]), sort_keys=False))


def _yaml(value):
    """NeMo's model.yaml form: `_target_` names the class, `_call_: false` a bare symbol."""
    if isinstance(value, Call):
        return {"_target_": value.target, **{k: _yaml(v) for k, v in value.kwargs.items()}}
    if isinstance(value, Ref):
        return {"_target_": value.target, "_call_": False}
    if isinstance(value, dict):
        return {k: _yaml(v) for k, v in value.items()}
    return value


class _FiddleJSON:
    """fiddle's JSON document (fiddle._src.experimental.serialization, format 0.0.1) for a tree of
    Call/Ref/dict/list/scalar values: objects by unique name, referenced by {"type": "ref"}."""

    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.counts: dict[str, int] = {}

    def document(self, root: Call) -> dict:
        ref = self._value(root, "<root>")
        return {"root": ref, "objects": self.objects, "refcounts": dict.fromkeys(self.objects, 1),
                "version": "0.0.1"}

    def _add(self, base: str, obj: dict) -> dict:
        self.counts[base] = self.counts.get(base, 0) + 1
        name = f"{base}_{self.counts[base]}"
        self.objects[name] = obj
        return {"type": "ref", "key": name}

    @staticmethod
    def _pyref(dotted: str) -> dict:
        module, name = dotted.rsplit(".", 1)
        return {"type": "pyref", "module": module, "name": name}

    def _value(self, value, path: str):
        if isinstance(value, Call):
            return self._buildable(value, path)
        if isinstance(value, Ref):
            return {**self._pyref(value.target), "paths": [path]}
        if isinstance(value, dict):
            items = [[f"Key(key={k!r})", self._value(v, f"{path}[{k!r}]")] for k, v in value.items()]
            keys = {"type": self._pyref("builtins.tuple"),
                    "items": [[f"Index(index={i})", k] for i, k in enumerate(value)], "metadata": None}
            return self._add("dict", {"type": self._pyref("builtins.dict"), "items": items, "metadata": keys,
                                      "paths": [path]})
        if isinstance(value, list):
            items = [[f"Index(index={i})", self._value(v, f"{path}[{i}]")] for i, v in enumerate(value)]
            return self._add("list", {"type": self._pyref("builtins.list"), "items": items, "metadata": None,
                                      "paths": [path]})
        return {"type": "leaf", "value": value, "paths": [path]}

    def _buildable(self, call: Call, path: str) -> dict:
        items = [[f"Attr(name={k!r})", self._value(v, f"{path}.{k}")] for k, v in call.kwargs.items()]
        names = self._add("tuple", {"type": self._pyref("builtins.tuple"), "metadata": None,
                                    "items": [[f"Index(index={i})", k] for i, k in enumerate(call.kwargs)]})
        empty = {"type": self._pyref("builtins.dict"), "items": [],
                 "metadata": {"type": self._pyref("builtins.tuple"), "items": [], "metadata": None}}
        metadata_type = self._pyref("fiddle._src.config.BuildableTraverserMetadata")
        metadata = self._add("buildable_traverser_metadata", {
            "type": metadata_type,
            "items": [["Attr(name='fn_or_cls')", self._pyref(call.target)], ["Attr(name='argument_names')", names],
                      ["Attr(name='argument_tags')", self._add("dict", dict(empty))],
                      ["Attr(name='argument_history')", self._add("dict", dict(empty))]],
            "metadata": metadata_type})
        kind = "fiddle._src.config.Config"
        base = "".join("_" + c.lower() if c.isupper() else c for c in call.target.rsplit(".", 1)[1]).lstrip("_")
        return self._add(base, {"type": self._pyref(kind), "items": items, "metadata": metadata, "paths": [path]})


# --- reading NeMo's model.yaml ---------------------------------------------------------------

# fields whose NeMo value kiln's engine cannot reproduce: (field, the value kiln models)
UNSUPPORTED = {
    "window_size": None, "qk_layernorm": False, "num_moe_experts": None, "multi_latent_attention": False,
    "apply_residual_connection_post_layernorm": False, "layernorm_zero_centered_gamma": False,
    "rotary_interleaved": False, "seq_len_interpolation_factor": None, "softmax_scale": None,
    "mtp_num_layers": None, "heterogeneous_block_specs": False,
}
MODEL_TYPES = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2"}  # config class name prefixes


def read_model_config(context: Path, rows: int) -> tuple[ModelConfig, str]:
    """kiln's ModelConfig and the HF model_type of a NeMo 2 checkpoint, from its `context/model.yaml`;
    `rows`: its embedding table's. NeMo builds exactly `vocab_size` rows when the config sets it (its
    importers do, unpadded, or leave it unset for the table to decide); otherwise it pads the
    tokenizer's size to `make_vocab_size_divisible_by`."""
    path = context / "model.yaml"
    if not path.exists():
        raise NemoFormatError(f"{context}: no model.yaml; a NeMo 2 checkpoint's context/ holds io.json and "
                              f"model.yaml (written by NeMo 2 or kiln)")
    doc = yaml.safe_load(path.read_text()) or {}
    c = doc.get("config")
    if not isinstance(c, dict):
        raise NemoFormatError(f"{path}: no `config:` mapping; not a NeMo 2 GPT model context")

    def need(key):
        if c.get(key) is None:
            raise NemoFormatError(f"{path}: config.{key} is missing; NeMo writes it for every GPT model")
        return c[key]

    for key, neutral in UNSUPPORTED.items():
        if c.get(key, neutral) != neutral:
            raise NemoFormatError(f"{path}: config.{key}={c[key]!r}: kiln's engine does not model it, so this "
                                  f"checkpoint cannot be converted without changing the model")
    target = str(c.get("_target_", ""))
    activation = c.get("activation_func") or {}
    act_name = str(activation.get("_target_", "")).rsplit(".", 1)[-1]
    gated = bool(c.get("gated_linear_unit", False))
    if gated and act_name == "silu":
        act = "swiglu"
    elif not gated and act_name in ("gelu", "openai_gelu"):
        act = "gelu_tanh" if act_name == "openai_gelu" or activation.get("approximate") == "tanh" else "gelu"
    else:
        raise NemoFormatError(f"{path}: config.activation_func={act_name or activation!r} with gated_linear_unit="
                              f"{gated}: kiln models SwiGLU (silu, gated) and GELU (not gated)")
    scaling = None
    if target.endswith(("Llama31Config", "Llama32Config")) or "scale_factor" in c:
        scaling = RopeScaling(factor=float(c.get("scale_factor", 8.0)),
                              low_freq_factor=float(c.get("low_freq_factor", 1.0)),
                              high_freq_factor=float(c.get("high_freq_factor", 4.0)),
                              original_max_position_embeddings=int(c.get("old_context_len", 8192)))
    m = ModelConfig(
        num_layers=need("num_layers"), hidden_size=need("hidden_size"), ffn_hidden_size=need("ffn_hidden_size"),
        num_attention_heads=need("num_attention_heads"),
        num_query_groups=c.get("num_query_groups") or need("num_attention_heads"),
        kv_channels=c.get("kv_channels"), vocab_size=c.get("vocab_size") or rows,
        make_vocab_size_divisible_by=int(c.get("make_vocab_size_divisible_by", 128)),
        max_position_embeddings=need("seq_length"), normalization=need("normalization"),
        norm_epsilon=need("layernorm_epsilon"), activation=act,
        position_embedding=need("position_embedding_type"), rotary_base=_whole(c.get("rotary_base", 10000)),
        rotary_percent=c.get("rotary_percent", 1.0), rope_scaling=scaling,
        tie_embeddings=bool(c.get("share_embeddings_and_output_weights", False)),
        add_bias_linear=bool(c.get("add_bias_linear", True)), add_qkv_bias=bool(c.get("add_qkv_bias", False)),
        init_method_std=c.get("init_method_std", 0.02),
    )
    if m.vocab_size == rows:
        m.make_vocab_size_divisible_by = nemo_divisor(rows)
    if m.padded_vocab_size(1) != rows:
        raise NemoFormatError(f"{path}: config.vocab_size={m.vocab_size} padded to a multiple of "
                              f"{m.make_vocab_size_divisible_by} is {m.padded_vocab_size(1)} rows, but the weights' "
                              f"embedding has {rows}: the context does not belong to these weights")
    name = target.rsplit(".", 1)[-1]
    model_type = next((t for prefix, t in MODEL_TYPES.items() if name.startswith(prefix)), None)
    if model_type is None:
        model_type = "gpt2" if m.position_embedding == "learned_absolute" else ("qwen2" if m.add_qkv_bias else "llama")
    return m, model_type


def _whole(number):
    """NeMo writes RoPE bases as floats; kiln's config holds whole ones as int."""
    return int(number) if float(number).is_integer() else number
