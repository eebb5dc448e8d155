"""`edgelm serve MODEL`: an OpenAI-compatible HTTP server with continuous batching; with --models-dir or --router,
any model of the catalog, chosen by each request's "model" and loaded on demand."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgelm.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    from .run import (add_context_arguments, add_control_arguments, add_lora_arguments, add_shift_arguments,
                      add_speculative_arguments, add_template_arguments, parse_size)

    p = argparse.ArgumentParser(prog="edgelm serve", description=__doc__)
    p.add_argument("model", nargs="?", help="GGUF file, hf:// reference or named model (default: the bundled model; "
                                            "in router mode: the model for requests that name none)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", help="require this key (Authorization: Bearer KEY or X-Api-Key); /health stays open")
    p.add_argument("--cors", metavar="ORIGIN", action="append", default=[],
                   help="let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API from a browser "
                        "(repeatable; default: none)")
    p.add_argument("--parallel", type=int, default=4, help="requests decoded together (default 4)")
    p.add_argument("--ctx", type=int, help="context of each request in tokens (default 2048, or a named model's "
                                             "num_ctx)")
    p.add_argument("--batch", type=int, default=512, help="tokens per decode step")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--gpu-layers", type=int, default=0)
    add_context_arguments(p)
    s = p.add_argument_group("context shift (Ollama's API shifts unless a request says \"shift\": false)")
    add_shift_arguments(s)
    add_lora_arguments(p)
    add_control_arguments(p)
    add_template_arguments(p)
    add_speculative_arguments(p, early_exit=False)
    p.add_argument("--slot-save-path", metavar="DIR",
                   help="let POST /slots/N?action=save|restore write and read slot KV files in DIR (llama-server's)")
    p.add_argument("--spm-infill", action="store_true",
                   help="/infill gives the suffix before the prefix (llama-server's flag, for models trained so)")
    p.add_argument("--alias", metavar="NAME", help="the model's name in /v1/models and answers (default: the file's)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which the server answers 503")
    p.add_argument("--max-tokens-cap", type=int, default=4096, help="no request may ask for more tokens")
    p.add_argument("--prompt-cache", metavar="DIR", help="keep prompt KV states in DIR across restarts")
    p.add_argument("--prompt-cache-size", metavar="SIZE", type=parse_size, default=None,
                   help="disk budget of --prompt-cache (default 1G)")
    r = p.add_argument_group("router mode (several models, chosen by each request's \"model\", as in Ollama)")
    r.add_argument("--router", action="store_true",
                   help="serve every model `edgelm list` shows, loading each on its first request")
    r.add_argument("--models-dir", metavar="DIR", help="and the GGUF models in DIR, by file name (implies --router)")
    r.add_argument("--models-max", type=int, default=4, metavar="N",
                   help="models loaded at once; the least recently used idle one makes room (default 4, 0: no limit)")
    r.add_argument("--keep-alive", default="5m", metavar="DURATION",
                   help="how long an idle model stays loaded (default 5m; 0: unload at once, -1: never); requests' "
                        "keep_alive overrides it")
    r.add_argument("--no-models-autoload", dest="autoload", action="store_false",
                   help="load models only through POST /models/load, not on a request")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log and every HTTP request")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, not {args.port}")
    import uvicorn

    from edgelm.server import ServerOptions, create_app

    from .run import context_from_args, control_from_args, lora_from_args, speculative_from_args, template_from_args

    if args.verbose:
        from edgelm.runtime.backend import set_verbose

        set_verbose(True)
    from edgelm.modelfile import find
    from edgelm.router import with_profile

    options = ServerOptions(model=args.model, api_key=args.api_key, cors_origins=tuple(args.cors),
                            n_parallel=args.parallel, n_ctx=args.ctx or 2048, n_batch=args.batch,
                            n_threads=args.threads, n_gpu_layers=args.gpu_layers, max_queue=args.max_queue,
                            max_tokens_cap=args.max_tokens_cap, prompt_cache=args.prompt_cache,
                            lora=tuple(lora_from_args(args) or ()), chat_template=template_from_args(args),
                            alias=args.alias, context_shift=args.context_shift, keep=args.keep,
                            spm_infill=args.spm_infill, slot_save_path=args.slot_save_path,
                            **control_from_args(args), **context_from_args(args),
                            **speculative_from_args(args))
    if args.prompt_cache_size is not None:
        options.prompt_cache_bytes = args.prompt_cache_size
    router = None
    if args.router or args.models_dir is not None:
        router = router_options(args, options)
    else:
        profile = find(args.model)  # a name made by `edgelm create`: its model and settings, under the flags
        if profile is not None:
            options = with_profile(options, profile, n_ctx=args.ctx, n_threads=args.threads)
    from edgelm import blobs, modelfile

    blobs.prune_unused(modelfile.used_files())  # uploads no create used, as Ollama prunes at its start
    app = create_app(options, router)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"edgelm: warning: serving on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    models = app.state.models
    what = (f"{len(models.catalog())} models (at most {args.models_max or 'any number'} loaded)" if models.routed
            else models.server.model_id)
    print(f"edgelm: serving {what} on http://{args.host}:{args.port} ({args.parallel} parallel)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                timeout_graceful_shutdown=5)
    return 0


def router_options(args, options):
    """RouterOptions from the command line; UsageError for flags that belong to one model."""
    one_model = [flag for flag, given in (("--lora", options.lora), ("--control-vector", options.control),
                                          ("--draft", options.draft), ("--alias", options.alias),
                                          ("--chat-template", options.chat_template)) if given]
    if one_model:
        raise UsageError(f"{one_model[0]} applies to one model, not to every model a router serves: give it to a "
                         "named model instead (`edgelm create NAME -f Modelfile`)")
    if args.models_max < 0:
        raise UsageError(f"--models-max must be 0 (no limit) or more, not {args.models_max}")
    if args.models_dir is not None and not Path(args.models_dir).is_dir():
        raise UsageError(f"--models-dir {args.models_dir}: no such folder")
    from edgelm.router import RouterOptions, parse_keep_alive

    return RouterOptions(models_dir=args.models_dir, models_max=args.models_max,
                         keep_alive=parse_keep_alive(args.keep_alive), autoload=args.autoload, default=args.model,
                         fixed={"n_ctx": args.ctx, "n_threads": args.threads})
