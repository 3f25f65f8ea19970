"""kiln: raw text to an aligned, deployable LLM on the NVIDIA NeMo stack."""

__version__ = "0.1.0"

# the megatron-core kiln is written and tested against (pyproject pins it; ranks check what they import)
MEGATRON_CORE = "0.16.1"
