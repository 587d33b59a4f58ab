"""reference_generate: the slow, single-call, obviously-correct block-diffusion generator.

It follows transformers 5.23.0 `DiffusionGemmaForBlockDiffusion.generate` step for step,
including the order of random draws (per canvas: one `randint` for the initial canvas;
per step: one `multinomial`, then one `randint` for renoising), so that under the same seed on CPU in
fp32 it returns the reference's exact tokens. The fast engine is tested against this function;
keep it simple rather than fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.transformer import DiffusionGemma
from .params import BUILT_IN as _D  # the built-in defaults
from .params import DiffusionParams
from .noise import TorchNoise
from .acceptance import entropy, entropy_bound_accept, step_temperature
from .stopping import StableAndConfident



@dataclass
class ReferenceOutput:
    sequences: torch.Tensor            # (B, L + n_canvases * C): prompt + committed canvases (pads after EOS)
    tokens_per_forward: torch.Tensor   # (B,) non-pad new tokens / decoder passes that row needed
    steps_per_canvas: list[int] = field(default_factory=list)   # denoising steps run, per canvas


def _eos_list(eos_token_id) -> list[int] | None:
    if eos_token_id is None:
        return None
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.no_grad()
def reference_generate(model: DiffusionGemma, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       max_new_tokens: int = 256, max_denoising_steps: int = _D.max_denoising_steps,
                       t_min: float = _D.t_min, t_max: float = _D.t_max, entropy_bound: float = _D.entropy_bound,
                       confidence_threshold: float = _D.confidence_threshold,
                       stability_threshold: int = _D.stability_threshold,
                       eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                       temperature: float = _D.temperature, fixed_steps: bool = _D.fixed_steps,
                       generator: torch.Generator | None = None,
                       noise=None, logits_processor: Callable | None = None, on_step: Callable | None = None,
                       return_output: bool = False, pixel_values: torch.Tensor | None = None,
                       image_position_ids: torch.Tensor | None = None):
    """Generate `ceil(max_new_tokens / C)` whole canvases after `input_ids` (B, L).

    Returns the sequences tensor (B, L + n*C), or a `ReferenceOutput` if `return_output`.
    Random draws come from `noise` (default: `TorchNoise(generator)`, transformers' call order; the
    engine's parity tests pass a `HashNoise`). `logits_processor(logits, step) -> logits` runs on the raw logits before the temperature (tests
    use it to force tokens). `on_step(canvas_index, step, argmax_canvas, accept_mask)` observes steps.
    """
    params = DiffusionParams(max_denoising_steps=max_denoising_steps, t_min=t_min, t_max=t_max,
                             entropy_bound=entropy_bound, confidence_threshold=confidence_threshold,
                             stability_threshold=stability_threshold, temperature=temperature, fixed_steps=fixed_steps)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, vocab, c = input_ids.shape[0], model.config.vocab_size, model.config.canvas_length
    n_canvases = math.ceil(max_new_tokens / c)
    eos = _eos_list(eos_token_id)
    noise = noise if noise is not None else TorchNoise(generator)
    eos_t = torch.tensor(eos, device=input_ids.device) if eos else None
    cache = model.new_cache(batch, input_ids.shape[1] + n_canvases * c)
    stopper = None if fixed_steps else StableAndConfident(stability_threshold, confidence_threshold)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    passes = torch.zeros(batch, dtype=torch.int, device=input_ids.device)
    sequences, new_ids, steps_per_canvas = input_ids, attention_mask, []
    images = {"pixel_values": pixel_values, "image_position_ids": image_position_ids}
    for index in range(n_canvases):
        model.encode(sequences[:, cache.length:], cache, new_ids, **images)   # prefill, then the last committed canvas
        new_ids, images = None, {}
        canvas = noise.init_canvas(batch, c, vocab, input_ids.device)
        argmax_canvas, steps = _denoise_canvas(model, cache, canvas, params, stopper, finished, passes, noise,
                                               logits_processor, lambda *a: on_step and on_step(index, *a))
        steps_per_canvas.append(steps)
        sequences = torch.cat((sequences, argmax_canvas), dim=-1)
        sequences, finished = _finalize_canvas(sequences, finished, c, eos_t, pad_token_id)
        if bool(finished.all()):
            break
    if not return_output:
        return sequences
    new = sequences[:, input_ids.shape[1]:]
    valid = (new != pad_token_id).sum(-1) if pad_token_id is not None else new.shape[1]
    return ReferenceOutput(sequences, valid / passes, steps_per_canvas)


def _denoise_canvas(model, cache, canvas, params: DiffusionParams, stopper, finished_seq, passes, noise,
                    logits_processor, on_step):
    """Run one canvas's denoising loop; returns (argmax canvas to commit, steps run)."""
    batch, n = canvas.shape[0], params.max_denoising_steps
    done = torch.zeros(batch, dtype=torch.bool, device=canvas.device)
    argmax_canvas, sc_logits, steps = canvas, None, 0
    if stopper is not None:
        stopper.reset()
    for step in range(n, 0, -1):                    # counts remaining steps, N .. 1
        passes += ~(done | finished_seq)
        steps += 1
        soft = model.soft_embedding(sc_logits) if sc_logits is not None else None
        logits = model.logits(model.denoise(canvas, cache, soft))          # (B, C, V) fp32
        if logits_processor is not None:
            logits = logits_processor(logits, step)
        temp = step_temperature(step, n, params.t_min, params.t_max)
        proc = logits / (temp * params.temperature if params.temperature not in (0, 1) else temp)
        sampled = noise.sample(torch.softmax(proc, dim=-1, dtype=torch.float32)) \
            if not params.greedy else proc.argmax(-1)
        new_argmax = proc.argmax(-1)
        accept = entropy_bound_accept(entropy(proc), params.entropy_bound)
        fresh = noise.renoise(batch, canvas.shape[1], model.config.vocab_size, canvas.device)
        next_canvas = torch.where(accept, sampled, fresh)   # earlier acceptances are not kept
        if stopper is not None:
            if bool(done.any()):                  # rows that stopped earlier stay frozen
                new_argmax = torch.where(done[:, None], argmax_canvas, new_argmax)
                next_canvas = torch.where(done[:, None], canvas, next_canvas)
                proc = torch.where(done[:, None, None], sc_logits, proc)
            done |= stopper(new_argmax, proc)
        sc_logits = proc.to(model.dtype)
        canvas, argmax_canvas = next_canvas, new_argmax
        on_step(step, argmax_canvas, accept)
        if bool(done.all()):
            break
    return argmax_canvas, steps


def _finalize_canvas(sequences, finished, c: int, eos_t, pad_token_id):
    """EOS anywhere in the new canvas finishes a row; with a pad id, rows finished earlier get an
    all-pad canvas and tokens after a row's first EOS become pad."""
    if eos_t is None:
        return sequences, finished
    new = sequences[:, -c:]
    finished_now = torch.isin(new, eos_t).any(-1)
    previously = finished
    finished = previously | finished_now
    if pad_token_id is not None and bool(finished.any()):
        sequences = sequences.clone()
        sequences[previously, -c:] = pad_token_id
        if bool(finished_now.any()):
            new = sequences[:, -c:]
            is_eos = torch.isin(new, eos_t)
            count = is_eos.cumsum(-1)
            new[(count > 0) & ~((count == 1) & is_eos)] = pad_token_id
    return sequences, finished
