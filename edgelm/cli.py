"""`edgelm` command line: a dispatcher; each subcommand lives in edgelm/commands/<name>.py."""
from __future__ import annotations

import importlib
import logging
import sys

from ._version import __version__
from .errors import EdgelmError

COMMANDS = {
    "run": "generate text from a model",
    "serve": "serve a model over an OpenAI-compatible HTTP API",
    "batch": "complete a JSONL file of prompts with continuous batching (resumable)",
    "convert": "convert a Hugging Face checkpoint to GGUF",
    "prune": "remove layers, heads, FFN channels or hidden dimensions: a smaller standard checkpoint",
    "distill": "train a (pruned) student on a teacher's distribution",
    "info": "show a GGUF file's metadata, tensors and sizes",
    "bench": "measure prompt and generation speed",
    "perplexity": "perplexity of a model on a text, from llama.cpp's logits",
    "exits": "per-layer early-exit agreement and predicted speedup; write an early-exit split",
    "cvector": "make a control vector (a steering direction per layer) from contrasting prompts",
    "pull": "download a model from the Hugging Face Hub into its cache",
    "create": "name a model with its adapters, parameters and system message, from an Ollama-style Modelfile",
    "list": "list the bundled model, named models and the GGUF models in the Hugging Face cache",
    "rm": "delete a named model, or a model from the Hugging Face cache",
}

USAGE = "usage: edgelm [--version] [--debug] <command> [<args>]\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {text}" for name, text in COMMANDS.items()
) + "\n\nRun `edgelm <command> --help` for a command's options. --debug shows tracebacks."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"edgelm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"edgelm: error: unknown command {name!r} (try: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"edgelm.commands.{name}")
        return module.main(rest) or 0
    except EdgelmError as e:
        return _fail(e, e.exit_code, debug)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0  # `edgelm run ... | head`
    except OSError as e:
        return _fail(e, 1, debug)
    except Exception as e:  # noqa: BLE001 - the CLI's promise is one line, not a traceback
        return _fail(e, 1, debug, prefix=f"internal error ({type(e).__name__}): ")


def _fail(err: BaseException, code: int, debug: bool, prefix: str = "") -> int:
    if debug:
        import traceback

        traceback.print_exception(err)
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    hint = "" if debug else " (--debug for details)" if prefix else ""
    print(f"edgelm: error: {prefix}{msg}{hint}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
