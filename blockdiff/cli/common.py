"""Flags shared by the subcommands, and the translation of parsed flags into library settings.

Every subcommand that loads a model takes the same `--model` (a directory or a hub id, resolved by
`hub.py` where the model is loaded), `--revision`, `--generation-config`, `--chat-template`,
`--dtype`, `--device`, `--compile`, `--threads`, `--tensor-parallel-size` and `--max-model-len`;
every subcommand that
samples takes the `SamplingParams` knobs under their own names (`--max-denoising-steps`,
`--entropy-bound`, ...). A knob flag left out stays unset, so the checkpoint's generation_config.json
applies, else the built-in default shown in `--help` (read from `SamplingParams.built_in()`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..engine.request import SamplingParams
from ..hardware import apply_threads
from ..hub import is_hub_id

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "default_model"

# SamplingParams fields offered on the command line, with their help text. Per request only:
REQUEST_FLAGS = {
    "max_tokens": "maximum new tokens",
    "seed": "random seed; the same seed gives the same text",
}
# ... and the knobs, which `serve` also takes as the defaults of requests that leave them out.
KNOB_FLAGS = {
    "temperature": "multiplies the t-min..t-max temperature schedule; 0 = greedy sampling",
    "top_k": "sample among the k most likely tokens (0 = off)",
    "top_p": "sample from the smallest set of tokens whose probability reaches p (1 = off)",
    "min_tokens": "no end-of-sequence token before this many new tokens (0 = off)",
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


def add_model_flags(p: argparse.ArgumentParser, *, max_model_len: int = 2048, compile_flag: bool = True,
                    positional: bool = False) -> None:
    """[MODEL_ID_OR_PATH] --model --revision --generation-config --chat-template --dtype --device
    --max-model-len [--compile] --threads --tensor-parallel-size."""
    where = ("a checkpoint directory (config.json + safetensors + tokenizer.json) or a Hugging Face hub id "
             "such as google/diffusiongemma-26B-A4B-it (downloaded to the HF cache; HF_TOKEN, HF_HUB_OFFLINE "
             "apply)")
    if positional:
        p.add_argument("model_arg", nargs="?", metavar="MODEL_ID_OR_PATH",
                       help=f"{where}; default: the embedded default model")
    p.add_argument("--model", default=None, help="the same as MODEL_ID_OR_PATH" if positional else
                   f"{where}; default: the embedded default model")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of a hub id (default main)")
    p.add_argument("--generation-config", choices=("auto", "none"), default="auto",
                   help="auto: request defaults come from the checkpoint's generation_config.json (then the "
                        "built-in values); none: ignore that file (default auto)")
    p.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                   help="a Jinja chat template to use instead of the checkpoint's")
    add_device_flags(p, compile_flag=compile_flag)
    p.add_argument("--max-model-len", type=int, default=max_model_len,
                   help=f"KV-cache positions per request: prompt + generated tokens (default {max_model_len})")


def add_device_flags(p: argparse.ArgumentParser, *, compile_flag: bool = True, dtype_choices=("float32", "bfloat16"),
                     device: str = "cpu") -> None:
    """--dtype --device [--compile] --threads --tensor-parallel-size."""
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
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model over N devices, one worker process each: cuda:0..N-1 with "
                        "--device cuda, N CPU processes sharing the cores with --device cpu (default 1)")


def add_sampling_flags(p: argparse.ArgumentParser, per_request: bool = True, **overrides) -> None:
    """One flag per `SamplingParams` knob (`--max-denoising-steps` for `max_denoising_steps`, ...), and
    with `per_request` also --max-tokens --seed --stop. `overrides` sets a default for this subcommand
    only (e.g. `seed=0`); other flags default to unset."""
    built_in = SamplingParams.built_in()
    for name, text in {**(REQUEST_FLAGS if per_request else {}), **KNOB_FLAGS}.items():
        default = overrides.get(name)
        kind = int if name in ("max_tokens", "min_tokens", "top_k", "seed", "max_denoising_steps",
                               "stability_threshold") else float
        if default is not None:
            shown = default
        elif name == "seed":
            shown = "drawn at random"
        else:
            shown = f"the checkpoint's generation_config.json, else {getattr(built_in, name)}"
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=default,
                       help=f"{text} (default: {shown})")
    p.add_argument("--fixed-steps", action="store_true", default=None,
                   help="always run every denoising step (no early stop)")
    if per_request:
        p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The `SamplingParams` that `add_sampling_flags` flags describe (flags left out stay unset)."""
    names = [n for n in {**REQUEST_FLAGS, **KNOB_FLAGS} if hasattr(args, n)]
    return SamplingParams(**{n: getattr(args, n) for n in names}, fixed_steps=args.fixed_steps,
                          stop=tuple(getattr(args, "stop", ())))


def model_path(args: argparse.Namespace) -> str | Path:
    """The model a subcommand runs, as given (a directory or a hub id), else the embedded default."""
    given = {m for m in (getattr(args, "model_arg", None), args.model) if m is not None}
    if len(given) > 1:
        raise ValueError("the model is given twice (MODEL_ID_OR_PATH and --model): give it once")
    return given.pop() if given else default_model_dir()


def model_name(model: str | Path) -> str:
    """The name clients see: a hub id as it is, a directory's name."""
    return model if is_hub_id(model) and not Path(model).is_dir() else Path(model).resolve().name


def build_llm(args: argparse.Namespace, **engine_kwargs):
    """The `LLM` that the model flags describe, with `--chat-template` applied."""
    from ..engine.engine import LLM

    positive(args, "tensor_parallel_size")
    llm = LLM(model_path(args), dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              revision=args.revision, generation_config=args.generation_config,
              tensor_parallel_size=args.tensor_parallel_size, **engine_kwargs)
    if args.chat_template is not None:
        if llm.tokenizer is None:
            raise ValueError("--chat-template needs a tokenizer")
        llm.tokenizer.set_chat_template(args.chat_template.read_text(encoding="utf-8"))
    return llm


def positive(args: argparse.Namespace, *names: str) -> None:
    """Raise `ValueError` naming the first flag whose value is < 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


def setup(args: argparse.Namespace) -> None:
    """Process-wide settings every model-running subcommand applies first."""
    apply_threads(getattr(args, "threads", None))
