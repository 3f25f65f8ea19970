"""Which mapping module serves a model: by HF model_type, or by a kiln ModelConfig's shape."""

from __future__ import annotations

from types import ModuleType

from kiln.config import ModelConfig
from kiln.conversion import gpt2, llama, moe
from kiln.errors import ConfigError

FAMILIES: dict[str, ModuleType] = {t: module for module in (llama, gpt2, moe) for t in module.MODEL_TYPES}


def for_model_type(model_type: str | None, source: str) -> ModuleType:
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not a family kiln converts; supported: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def model_type_for(m: ModelConfig) -> str:
    """The HF model_type a kiln ModelConfig exports as."""
    if m.moe is not None:
        return moe.model_type_for(m)
    if m.position_embedding == "learned_absolute" and m.normalization == "LayerNorm":
        return "gpt2"
    if m.activation == "swiglu" and m.normalization == "RMSNorm" and m.position_embedding == "rope":
        return "qwen2" if m.add_qkv_bias else "llama"
    raise ConfigError("this model is neither GPT-2- nor Llama-shaped; kiln cannot name its HF architecture")
