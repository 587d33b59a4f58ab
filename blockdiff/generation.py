"""Text in, text out, on top of the reference sampler: what the CLI uses until the engine lands.

Contract, as users of other engines expect:
- at most `max_tokens` new tokens are returned, even though the sampler works in whole canvases;
- the text ends at the first EOS token (finish_reason "stop") or at the first stop string, which is
  not included (finish_reason "stop"); otherwise finish_reason is "length";
- the same seed gives the same text (a private torch.Generator, not the global RNG).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .diffusion.params import DiffusionParams
from .diffusion.reference import reference_generate
from .engine.output import TextState
from .model.transformer import DiffusionGemma
from .tokenizer import Tokenizer


@dataclass
class TextResult:
    text: str
    token_ids: list[int]
    finish_reason: str                      # "stop" | "length"
    steps_per_canvas: list[int] = field(default_factory=list)


def generate_text(model: DiffusionGemma, tokenizer: Tokenizer, prompt: str | list[int], *, max_tokens: int = 128,
                  params: DiffusionParams | None = None, seed: int = 0, stop: list[str] | None = None) -> TextResult:
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    params = params or DiffusionParams()
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("prompt is empty")
    vocab = model.config.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    eos = sorted(set(model.config.eos_ids) | set(tokenizer.eos_ids))
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = reference_generate(
        model, torch.tensor([ids], device=model.device), max_new_tokens=max_tokens,
        max_denoising_steps=params.max_denoising_steps, t_min=params.t_min, t_max=params.t_max,
        entropy_bound=params.entropy_bound, confidence_threshold=params.confidence_threshold,
        stability_threshold=params.stability_threshold, temperature=params.temperature,
        fixed_steps=params.fixed_steps, eos_token_id=eos, pad_token_id=None, generator=gen, return_output=True)
    state = TextState(tokenizer.decode, set(eos), max_tokens, tuple(stop or ()))
    state.add(out.sequences[0, len(ids):].tolist())
    return TextResult(state.text, state.ids, state.finish_reason or "length", out.steps_per_canvas)
