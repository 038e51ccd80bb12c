"""overnight: OpenAI-compatible batch inference for self-hosted LLM engines."""

__version__ = "0.1.0"

__all__ = ["__version__"]
