"""Fine-tune causal language models with LoRA from one validated YAML config."""

__version__ = "0.1.0"
