"""Flags shared by the subcommands, and the translation of parsed flags into library settings.

Every subcommand that loads a model takes the same `--model`, `--dtype`, `--device`, `--compile`,
`--threads` and `--max-model-len`; every subcommand that samples takes the `SamplingParams` knobs
under their own names (`--max-denoising-steps`, `--entropy-bound`, ...), with defaults read from
`SamplingParams` itself, so a default is written in exactly one place.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..engine.request import SamplingParams
from ..hardware import apply_threads

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "default_model"

# SamplingParams fields offered on the command line, with their help text.
SAMPLING_FLAGS = {
    "max_tokens": "maximum new tokens",
    "temperature": "multiplies the t-min..t-max temperature schedule; 0 = greedy sampling",
    "top_k": "sample among the k most likely tokens (0 = off)",
    "top_p": "sample from the smallest set of tokens whose probability reaches p (1 = off)",
    "seed": "random seed; the same seed gives the same text",
    "max_denoising_steps": "maximum denoising steps per canvas",
    "t_min": "temperature at the last step",
    "t_max": "temperature at the first step",
    "entropy_bound": "accept low-entropy tokens while their summed entropy stays under this",
    "confidence_threshold": "stop a canvas when its mean entropy is below this ...",
    "stability_threshold": "... and its argmax was unchanged for this many steps",
}


def default_model_dir() -> Path:
    """The embedded default model shipped inside the package."""
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the embedded default model is missing from {DEFAULT_MODEL}; pass --model")
    return DEFAULT_MODEL


def add_model_flags(p: argparse.ArgumentParser, *, max_model_len: int = 2048, compile_flag: bool = True) -> None:
    """--model --dtype --device --max-model-len [--compile] --threads."""
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint directory (config.json + safetensors + tokenizer.json); "
                        "default: the embedded default model")
    add_device_flags(p, compile_flag=compile_flag)
    p.add_argument("--max-model-len", type=int, default=max_model_len,
                   help=f"KV-cache positions per request: prompt + generated tokens (default {max_model_len})")


def add_device_flags(p: argparse.ArgumentParser, *, compile_flag: bool = True, dtype_choices=("float32", "bfloat16"),
                     device: str = "cpu") -> None:
    """--dtype --device [--compile] --threads."""
    p.add_argument("--dtype", choices=dtype_choices, default=None,
                   help="weights and activations dtype (default: bfloat16 where the device has fast bf16, "
                        "else float32)")
    p.add_argument("--device", default=device, help=f"torch device (default {device})")
    if compile_flag:
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the layers and the sampler: faster steps after 1-2 minutes of "
                            "compiling (default: on for CUDA, off for CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for tensor ops (default: torch's choice, one per physical core)")


def add_sampling_flags(p: argparse.ArgumentParser, **overrides) -> None:
    """One flag per `SamplingParams` knob (`--max-denoising-steps` for `max_denoising_steps`, ...).
    `overrides` changes a default for this subcommand only (e.g. `max_tokens=128`)."""
    fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    for name, text in SAMPLING_FLAGS.items():
        default = overrides.get(name, fields[name].default)
        kind = int if name in ("max_tokens", "top_k", "seed", "max_denoising_steps", "stability_threshold") else float
        shown = "drawn at random" if default is None else default
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=default,
                       help=f"{text} (default {shown})")
    p.add_argument("--fixed-steps", action="store_true", help="always run every denoising step (no early stop)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The `SamplingParams` that `add_sampling_flags` flags describe."""
    values = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    return SamplingParams(**values, fixed_steps=args.fixed_steps, stop=tuple(args.stop))


def model_path(args: argparse.Namespace) -> Path:
    return args.model if args.model is not None else default_model_dir()


def positive(args: argparse.Namespace, *names: str) -> None:
    """Raise `ValueError` naming the first flag whose value is < 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


def setup(args: argparse.Namespace) -> None:
    """Process-wide settings every model-running subcommand applies first."""
    apply_threads(getattr(args, "threads", None))
