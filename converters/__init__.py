"""edgelm's conversion pipeline: Hugging Face checkpoints to GGUF (installed as `edgelm.converters`)."""
from .convert import ConvertResult, convert
from .prune import PruneOptions, PruneReport, prune

__all__ = ["ConvertResult", "PruneOptions", "PruneReport", "convert", "prune"]
