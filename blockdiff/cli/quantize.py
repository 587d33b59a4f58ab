"""`blockdiff quantize SRC DST --scheme ...`: write a quantized (compressed-tensors) copy of a checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from ..quant.scheme import SCHEMES

    schemes = "; ".join(f"{s.name}: {s.description}" for s in SCHEMES.values())
    p = sub.add_parser("quantize", help="write a quantized copy of a checkpoint (compressed-tensors layout)",
                       description="Quantize checkpoint directory SRC into the new directory DST, tensor by tensor. "
                                   "The router stays in its stored dtype, and so does the embedding (tied LM head) "
                                   "unless --embedding int8. "
                                   f"Schemes: {schemes}.")
    p.add_argument("src", metavar="SRC", type=Path, help="checkpoint directory with float weights")
    p.add_argument("dst", metavar="DST", type=Path, help="new directory to write (must not exist)")
    p.add_argument("--scheme", required=True, help=f"one of {', '.join(SCHEMES)}")
    p.add_argument("--embedding", choices=["bf16", "int8"], default="bf16",
                   help="the embedding (tied LM head): bf16 keeps its stored dtype (default); int8 stores int8 rows "
                        "with one scale per token (weight-only), half the size")
    p.add_argument("--shard-gb", type=float, default=2.0, help="maximum size of one output shard in GB (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..quant.convert import quantize

    if args.shard_gb <= 0:
        raise ValueError("--shard-gb must be > 0")
    if not args.src.is_dir():
        raise FileNotFoundError(f"model directory {args.src} does not exist")
    out = quantize(args.src, args.dst, args.scheme, int(args.shard_gb * 1e9), progress=not args.no_progress,
                   embedding=args.embedding)
    print(f"wrote {out}")
    return 0
