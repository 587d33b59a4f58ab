"""The `blockdiff` command line: argument parsing only; the work lives in the library.

Errors the user can fix (bad paths, bad options, bad checkpoints) print one line
`blockdiff: error: ...` and exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .hardware import add_threads_flag, apply_threads

DEFAULT_MODEL = Path(__file__).parent / "default_model"


def default_model_dir() -> Path:
    """The embedded default model; until one is trained, a tiny random model made on first use."""
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blockdiff" / "random-tiny"
    print("blockdiff: no trained default model is bundled yet; using a tiny random model "
          f"({cache}): its output is noise", file=sys.stderr)
    if not (cache / "config.json").is_file():
        from .random_model import create_random_model
        create_random_model(cache)
    return cache


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of PROMPT with block diffusion and print it.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint directory (config.json + safetensors + tokenizer.json); "
                        "default: the embedded default model")
    p.add_argument("--max-tokens", type=int, default=128, help="maximum new tokens (default 128)")
    p.add_argument("--steps", type=int, default=48, help="maximum denoising steps per canvas (default 48)")
    p.add_argument("--fixed-steps", action="store_true", help="always run --steps steps (no early stopping)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same text (default 0)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="multiplies the t-min..t-max temperature schedule; 0 = greedy sampling (default 1.0)")
    p.add_argument("--t-min", type=float, default=0.4, help="temperature at the last step (default 0.4)")
    p.add_argument("--t-max", type=float, default=0.8, help="temperature at the first step (default 0.8)")
    p.add_argument("--entropy-bound", type=float, default=0.1,
                   help="accept low-entropy tokens while their summed entropy stays under this (default 0.1)")
    p.add_argument("--confidence-threshold", type=float, default=0.005,
                   help="stop a canvas when its mean entropy is below this ... (default 0.005)")
    p.add_argument("--stability-threshold", type=int, default=1,
                   help="... and its argmax was unchanged for this many steps (default 1)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the tokenizer's chat template")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and activations dtype (default: bfloat16 where the device has fast bf16, "
                        "else float32)")
    p.add_argument("--max-model-len", type=int, default=4096,
                   help="KV-cache positions: prompt + generated tokens (default 4096)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_threads_flag(p)
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    apply_threads(args.threads)
    from .engine.engine import LLM
    from .engine.request import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                            stop=tuple(args.stop), max_denoising_steps=args.steps, fixed_steps=args.fixed_steps,
                            t_min=args.t_min, t_max=args.t_max, entropy_bound=args.entropy_bound,
                            confidence_threshold=args.confidence_threshold,
                            stability_threshold=args.stability_threshold)
    path = args.model if args.model is not None else default_model_dir()
    llm = LLM(path, dtype=args.dtype, device=args.device, max_num_seqs=1,
              max_model_len=args.max_model_len)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    for out in llm.stream(prompt, params):      # print each canvas's text as it commits
        print(out.delta_text, end="", flush=True)
    print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockdiff", description="Block-diffusion language models (DiffusionGemma).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate(sub)
    from .bench_report import add_cli as add_bench
    from .server import add_cli as add_serve
    from .train.data import add_cli as add_data
    from .train.evaluate import add_cli as add_eval
    from .train.export import add_cli as add_export
    from .train.trainer import add_cli as add_train

    for add in (add_serve, add_data, add_train, add_export, add_eval, add_bench):
        add(sub)
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


if __name__ == "__main__":
    sys.exit(main())
