"""`blockdiff serve`: an OpenAI-compatible HTTP server with live canvas streaming and a playground.

    blockdiff serve --model DIR --port 8000 [--api-key KEY]
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "NAME", "prompt": "Hello", "max_tokens": 32, "max_denoising_steps": 8}'

Open http://HOST:PORT/ for the playground. See app.py for the routes and error rules,
protocol.py for the accepted fields, chunks.py for the `blockdiff_*` extras in responses.
"""
from __future__ import annotations

import argparse

import os
import sys
from pathlib import Path

from ..hardware import add_threads_flag, apply_threads


def add_cli(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a model over an OpenAI-compatible HTTP API, with a browser "
                                   "playground at /.")
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("BLOCKDIFF_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $BLOCKDIFF_API_KEY, else no key)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests denoised together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests (choices) waiting for a slot before answering 429 (default 64)")
    p.add_argument("--max-model-len", type=int, default=2048, help="prompt + output tokens (default 2048)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let open requests finish (default 30)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: auto")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the layers and the sampler: faster steps after 1-2 minutes of compiling "
                        "(default: on for CUDA, off for CPU)")
    add_threads_flag(p)
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    apply_threads(args.threads)
    import uvicorn

    from ..cli import default_model_dir
    from ..engine.engine import LLM
    from .app import ServerConfig, create_app

    for name in ("max_num_seqs", "max_model_len", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0 or args.request_timeout <= 0:
        raise ValueError("--max-queue must be >= 0 and --request-timeout > 0")
    path = args.model if args.model is not None else default_model_dir()
    llm = LLM(path, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, compile=args.compile)
    if llm.compiled:
        print("blockdiff: compiling (1-2 minutes)...", file=sys.stderr, flush=True)
        llm.warm_up()
    config = ServerConfig(args.served_model_name or Path(path).resolve().name, args.api_key, args.max_queue,
                          args.request_timeout, args.max_body_bytes)
    uvicorn.run(create_app(llm, config), host=args.host, port=args.port,
                timeout_graceful_shutdown=args.shutdown_timeout, log_level="info")
    return 0
