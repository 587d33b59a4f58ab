"""Sequence-level knowledge distillation data: an AR teacher writes the text a diffusion model trains on.

Parallel decoders trained on raw text learn every way a sentence can go on at once and, sampling
positions independently, mix them ("multi-modality"); trained on one teacher's own outputs they see a
single mode per prompt (Kim & Rush 2016; Gu et al. 2018; Zhou et al. 2020).

Contract: `distill(DistillConfig)` writes a data directory that `blockdiff train` reads like the one
`blockdiff data` writes:
- `train.bin`: documents `<bos> prompt continuation <eos>`, where the prompt is `prompt_tokens` real
  tokens from a random window of the corpus's train split and the continuation is the teacher's AR
  sample (its encoder through the tied head: the AR baseline, or any DiffusionGemma) of up to
  `new_tokens` tokens at `temperature`, cut at its first end-of-sequence token;
- `val.bin`, `tokenizer/`: the corpus's, so validation losses stay on real text and compare with
  runs on raw text; `meta.json` with the split sizes and the settings under `distill`.
Chunk k of `batch` documents depends only on (seed, k): an interrupted run continues where it stopped
(it counts the chunks already in `train.bin` from `meta.json`'s `chunks_done`).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import load_model
from ..engine.ar import ar_generate
from .data import TokenDataset


@dataclass(frozen=True)
class DistillConfig:
    teacher: str                 # model directory of the teacher
    corpus_dir: str              # a `blockdiff data` output: train.bin, val.bin, meta.json, tokenizer/
    out_dir: str
    tokens: int = 8_000_000      # train tokens to write (whole chunks, so a little more)
    prompt_tokens: int = 32
    new_tokens: int = 224        # prompt + continuation = 256, the default configs' seq_len
    temperature: float = 0.6      # one mode per prompt, yet varied text: see the model card for measurements
    batch: int = 32              # documents generated together
    seed: int = 0

    def __post_init__(self):
        for name in ("tokens", "prompt_tokens", "new_tokens", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def distill(cfg: DistillConfig) -> dict:
    """Generate until `train.bin` holds >= cfg.tokens tokens; return the meta dict written."""
    corpus, out = Path(cfg.corpus_dir), Path(cfg.out_dir)
    data = TokenDataset(corpus)
    meta = _prepare(cfg, corpus, out, data.meta)
    teacher = load_model(cfg.teacher, dtype=torch.float32).eval()
    if teacher.config.vocab_size < data.meta["vocab_size"]:
        raise ValueError(f"the teacher's vocabulary ({teacher.config.vocab_size}) is smaller than the corpus's")
    bos, eos = data.meta["bos_id"], data.meta["eos_id"]
    written, start = meta["splits"]["train"]["tokens"], time.perf_counter()
    with (out / "train.bin").open("ab") as f, tqdm(total=cfg.tokens, initial=written, unit="tok") as bar:
        while written < cfg.tokens:
            k = meta["distill"]["chunks_done"]
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
            prompts = data.get_batch("train", cfg.batch, cfg.prompt_tokens, gen).tolist()
            out_ids = ar_generate(teacher, prompts, cfg.new_tokens, cfg.temperature, seed=cfg.seed * 1_000_003 + k,
                                  eos_ids={eos}).token_ids
            flat = np.fromiter((i for p, c in zip(prompts, out_ids) for i in [bos, *p, *c, eos]),
                               dtype=data.meta["dtype"])
            flat.tofile(f)
            f.flush()
            written += flat.size
            bar.update(flat.size)
            meta["splits"]["train"] = {"docs": meta["splits"]["train"]["docs"] + cfg.batch, "tokens": written}
            meta["distill"]["chunks_done"] = k + 1
            (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")   # after the bytes: resumable
    meta["distill"]["last_run_tok_s"] = (written - meta["distill"].get("resumed_at", 0)) / (
        time.perf_counter() - start)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _prepare(cfg: DistillConfig, corpus: Path, out: Path, corpus_meta: dict) -> dict:
    """Start `out` (val.bin and tokenizer copied, empty train.bin) or reopen an interrupted run."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "tokens")}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get("distill", {}).get(k) for k in settings} != settings:
            raise ValueError(f"{out} was distilled with other settings; use another --out")
        size = (out / "train.bin").stat().st_size // np.dtype(meta["dtype"]).itemsize
        if size != meta["splits"]["train"]["tokens"]:        # a chunk half written: drop it
            with (out / "train.bin").open("r+b") as f:
                f.truncate(meta["splits"]["train"]["tokens"] * np.dtype(meta["dtype"]).itemsize)
        meta["distill"]["resumed_at"] = meta["splits"]["train"]["tokens"]
        return meta
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(corpus / "val.bin", out / "val.bin")
    tokenizer = corpus / corpus_meta.get("tokenizer_dir", "tokenizer")
    if tokenizer.is_dir():
        shutil.copytree(tokenizer, out / "tokenizer", dirs_exist_ok=True)
    (out / "train.bin").write_bytes(b"")
    meta = {**corpus_meta, "tokenizer_dir": "tokenizer",
            "splits": {"train": {"docs": 0, "tokens": 0}, "val": corpus_meta["splits"]["val"]},
            "distill": {**settings, "chunks_done": 0, "resumed_at": 0}}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta
