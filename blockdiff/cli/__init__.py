"""The `blockdiff` command line: every subcommand and its flags; the work lives in the library.

Errors the user can fix (bad paths, bad options, bad checkpoints) print one line
`blockdiff: error: ...` and exit with status 2, never a traceback; so does a tensor-parallel worker
that dies (status 1).
"""
from __future__ import annotations

import argparse
import sys

from . import bench, generate, quantize, serve, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockdiff", description="Block-diffusion language models (DiffusionGemma).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate.add_parser(sub)
    serve.add_parser(sub)
    train.add_parsers(sub)
    bench.add_parser(sub)
    quantize.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError) as err:   # ConfigError/CheckpointError are ValueErrors
        print(f"blockdiff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except RuntimeError as err:
        from ..distributed.executor import WorkerError     # imported only when needed

        if not isinstance(err, WorkerError):
            raise
        print(f"blockdiff: error: {err}", file=sys.stderr)   # a tensor-parallel worker died: no traceback
        return 1
