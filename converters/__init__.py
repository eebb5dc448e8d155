"""edgelm's conversion pipeline: Hugging Face checkpoints to GGUF (installed as `edgelm.converters`)."""
from .convert import ConvertResult, convert

__all__ = ["ConvertResult", "convert"]
