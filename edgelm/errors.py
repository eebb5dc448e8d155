"""One error hierarchy. The CLI prints `str(err)` on one line and exits non-zero."""
from __future__ import annotations


class EdgelmError(Exception):
    """Base class of every error edgelm raises on purpose."""

    exit_code = 1


class UsageError(EdgelmError, ValueError):
    """A bad argument or option value; names the offending field."""

    exit_code = 2


class ModelNotFoundError(EdgelmError, FileNotFoundError):
    """A model path or reference that does not resolve to a file."""


class GGUFError(EdgelmError):
    """A file that is not a well-formed GGUF (bad magic, truncated, inconsistent tables)."""


class DownloadError(EdgelmError):
    """A model reference that could not be fetched: network, authentication, offline mode or a bad transfer."""


class ModelLoadError(EdgelmError):
    """llama.cpp refused a file that passed edgelm's own checks."""


class ConversionError(EdgelmError):
    """A checkpoint that cannot be converted (missing files, unknown architecture, bad tensors)."""


class InsufficientMemoryError(EdgelmError):
    """A model and context that would not fit in the memory available (checked before llama.cpp allocates)."""


class InsufficientStorageError(EdgelmError):
    """A file that would not fit on the disk (an upload, a conversion), refused before it is written."""


class ContextOverflowError(EdgelmError):
    """A prompt longer than the context window."""


class NativeError(EdgelmError):
    """The native kernels are missing or failed."""


class ChatTemplateError(EdgelmError):
    """A chat template that does not parse, fails while rendering, or rejects the conversation."""


class TemplateSecurityError(ChatTemplateError):
    """A chat template that reached for Python internals or tried to change its inputs (blocked by the sandbox)."""
