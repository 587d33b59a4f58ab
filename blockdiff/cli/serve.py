"""`blockdiff serve`: an OpenAI-compatible HTTP server with live canvas streaming and a playground.

    blockdiff serve google/diffusiongemma-26B-A4B-it --port 8000 [--api-key KEY]
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "NAME", "prompt": "Hello", "max_tokens": 32, "max_denoising_steps": 8}'
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import (add_model_flags, add_sampling_flags, build_llm, model_name, model_path, positive,
                     sampling_params, setup)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a model over an OpenAI-compatible HTTP API, with a browser "
                                   "playground at /.")
    add_model_flags(p, max_model_len=2048, positional=True)
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the hub id, or the checkpoint directory's name)")
    add_sampling_flags(p, per_request=False)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("BLOCKDIFF_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $BLOCKDIFF_API_KEY, else no key)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests denoised together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests (choices) waiting for a slot before answering 429 (default 64)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body (default 1 MiB; 20 MiB for a model that takes images)")
    p.add_argument("--max-images-per-prompt", type=int, default=4, help="images per chat request (default 4)")
    p.add_argument("--allowed-local-media-path", type=Path, default=None, metavar="DIR",
                   help="let image_url parts name file:// paths under DIR (default: refused); remote "
                        "http(s) image URLs are always refused")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let open requests finish, then exit 0 (default 30)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a new connection has to send its request headers (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup(args)
    positive(args, "max_num_seqs", "max_model_len", "max_images_per_prompt")
    if args.max_body_bytes is not None:
        positive(args, "max_body_bytes")
    if args.max_queue < 0 or args.request_timeout <= 0 or args.header_timeout <= 0:
        raise ValueError("--max-queue must be >= 0, --request-timeout and --header-timeout > 0")
    from ..server.app import ServerConfig, create_app
    from ..server.http_server import serve

    llm = build_llm(args, max_num_seqs=args.max_num_seqs, compile=args.compile,
                    sampling_defaults=sampling_params(args),        # request > these flags > checkpoint
                    max_images_per_prompt=args.max_images_per_prompt,
                    allowed_local_media_path=args.allowed_local_media_path)
    if args.max_body_bytes is None:
        args.max_body_bytes = 20 << 20 if llm.supports_images else 1 << 20
    if llm.compiled:
        print("blockdiff: compiling (1-2 minutes)...", file=sys.stderr, flush=True)
        llm.warm_up()
    config = ServerConfig(args.served_model_name or model_name(model_path(args)), args.api_key, args.max_queue,
                          args.request_timeout, args.max_body_bytes)
    try:
        serve(create_app(llm, config), args.host, args.port, args.shutdown_timeout, args.header_timeout)
    finally:
        llm.close()                               # tensor parallelism: stop the worker processes
    return 0
