"""edgelm: an edge / on-device LLM inference runtime."""
from ._version import __version__
from .errors import EdgelmError

__all__ = ["EdgelmError", "Model", "__version__", "load"]


def __getattr__(name: str):
    # llama.cpp loads on first use, so `import edgelm` (and `edgelm --version`) stays fast
    if name in ("load", "Model"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgelm' has no attribute {name!r}")
