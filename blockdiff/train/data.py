"""Training data: tokenizer training, corpus tokenization, random-window batches, `data` CLI.

Contract:
- `train_tokenizer(corpus_dir, out_dir, vocab_size)` trains a byte-level BPE on `train.jsonl`
  (never on val) with the special tokens `SPECIAL_TOKENS` at ids 0..4, and saves it with
  `blockdiff.tokenizer.Tokenizer.save`.
- `tokenize_corpus(corpus_dir, tokenizer_dir)` writes `train.bin` / `val.bin`: flat arrays of
  token ids, each document as `<bos> tokens <eos>`, uint16 when the vocabulary fits else uint32,
  and `meta.json` describing them. The bins live next to the jsonl files in `corpus_dir`.
- `TokenDataset(corpus_dir).get_batch(split, batch_size, seq_len, generator)` returns a
  `LongTensor[batch_size, seq_len]` of uniformly random windows, reproducible from the generator.
  Windows may cross document boundaries; the `<bos>`/`<eos>` tokens mark them.
- `run_data_pipeline(cfg)` runs build -> tokenizer -> tokenize (`blockdiff data`).
Corpus building itself lives in `corpus.py` and the readers in `sources.py`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from blockdiff.tokenizer import SPECIAL_TOKENS, Tokenizer
from blockdiff.train.corpus import SPLITS, CorpusConfig, build_corpus, read_documents
from blockdiff.train.sources import SOURCES, get_sources

__all__ = ["SPECIAL_TOKENS", "build_corpus", "train_tokenizer", "tokenize_corpus", "TokenDataset",
           "DataConfig", "run_data_pipeline", "summary"]

ENCODE_BATCH = 1024  # documents per encode_batch call: enough to keep the Rust threads busy


def train_tokenizer(corpus_dir: str | Path, out_dir: str | Path, vocab_size: int = 8192) -> Tokenizer:
    """Train a byte-level BPE on the corpus's train split and save it to out_dir."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must cover the 256 bytes and special tokens, got {vocab_size}")
    backend = HFTokenizer(models.BPE())
    # Byte-level: every string is encodable (no <unk>), and decode inverts encode exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(read_documents(corpus_dir, "train"), trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert backend.token_to_id(token) == i, f"{token} landed at {backend.token_to_id(token)}"
    tok = Tokenizer(backend, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                              "additional_special_tokens": list(SPECIAL_TOKENS[3:])})
    tok.save(out_dir)
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _batched(items: Iterator[str], n: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_corpus(corpus_dir: str | Path, tokenizer_dir: str | Path) -> dict:
    """Write `<split>.bin` and `meta.json` into corpus_dir; return the meta dict."""
    corpus_dir = Path(corpus_dir)
    tok = Tokenizer.from_dir(tokenizer_dir)
    if tok.bos_id is None:
        raise ValueError(f"tokenizer in {tokenizer_dir} has no bos_token; documents need one")
    dtype = token_dtype(tok.vocab_size)
    tokenizer_json = (Path(tokenizer_dir) / "tokenizer.json").read_bytes()
    # Relative path so the corpus directory can move; the hash catches a retrained tokenizer.
    meta = {"dtype": dtype.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "tokenizer_dir": os.path.relpath(tokenizer_dir, corpus_dir),
            "tokenizer_sha256": hashlib.sha256(tokenizer_json).hexdigest(), "splits": {}}
    for split in SPLITS:
        docs = tokens = 0
        with (corpus_dir / f"{split}.bin").open("wb") as f:
            batches = _batched(read_documents(corpus_dir, split), ENCODE_BATCH)
            for batch in tqdm(batches, desc=f"tokenize {split}", unit="batch", leave=False):
                ids = [[tok.bos_id, *doc, tok.eos_id] for doc in tok.encode_batch(batch)]
                flat = np.fromiter((i for doc in ids for i in doc), dtype=dtype)
                flat.tofile(f)
                docs, tokens = docs + len(batch), tokens + flat.size
        meta["splits"][split] = {"docs": docs, "tokens": tokens}
    (corpus_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class TokenDataset:
    """Random fixed-length windows from the memory-mapped `<split>.bin` arrays."""

    def __init__(self, corpus_dir: str | Path):
        self.dir = Path(corpus_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"token metadata not found: {meta_path} (run tokenize_corpus first)")
        self.meta = json.loads(meta_path.read_text())
        self._arrays: dict[str, np.memmap] = {}

    def tokens(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._arrays:
            path = self.dir / f"{split}.bin"
            if not path.is_file():
                raise FileNotFoundError(f"token file not found: {path}")
            self._arrays[split] = np.memmap(path, dtype=self.meta["dtype"], mode="r")
        return self._arrays[split]

    def get_batch(self, split: str, batch_size: int, seq_len: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        data = self.tokens(split)
        if len(data) < seq_len:
            raise ValueError(f"{split} split has {len(data)} tokens, fewer than seq_len={seq_len}")
        # Starts drawn with torch so one Generator seeds the whole training run.
        starts = torch.randint(0, len(data) - seq_len + 1, (batch_size,), generator=generator)
        rows = np.stack([data[s : s + seq_len] for s in starts.tolist()]).astype(np.int64)
        return torch.from_numpy(rows)  # (B, T)


@dataclass(frozen=True)
class DataConfig:
    out_dir: Path
    sources: tuple[str, ...] = tuple(SOURCES)
    vocab_size: int = 8192
    corpus: CorpusConfig = CorpusConfig()
    cache_dir: Path = Path.home() / ".cache" / "blockdiff" / "sources"
    install: bool = False


def run_data_pipeline(cfg: DataConfig) -> dict:
    """build_corpus -> train_tokenizer -> tokenize_corpus; tokenizer saved in out_dir/tokenizer."""
    manifest = build_corpus(cfg.out_dir, get_sources(cfg.sources), cfg.corpus, cfg.cache_dir, cfg.install)
    train_tokenizer(cfg.out_dir, cfg.out_dir / "tokenizer", cfg.vocab_size)
    meta = tokenize_corpus(cfg.out_dir, cfg.out_dir / "tokenizer")
    return {"manifest": manifest, "meta": meta}


def summary(result: dict) -> str:
    t, s = result["manifest"]["totals"], result["meta"]["splits"]
    return (f"corpus: {t['train_docs']} train / {t['val_docs']} val docs, "
            f"{t['train_bytes'] / 1e6:.1f} / {t['val_bytes'] / 1e6:.2f} MB, {t['duplicates']} duplicates "
            f"removed; tokens: {s['train']['tokens']:,} train / {s['val']['tokens']:,} val "
            f"(vocab {result['meta']['vocab_size']}, {result['meta']['dtype']})")
