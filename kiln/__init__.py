"""kiln: raw text to an aligned, deployable LLM on the NVIDIA NeMo stack."""

__version__ = "0.1.0"
