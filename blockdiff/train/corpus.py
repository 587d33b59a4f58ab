"""Build a deduplicated, split text corpus from `Source`s.

Contract: `build_corpus(out_dir, sources, config)` writes
- `train.jsonl` / `val.jsonl`: one `{"text": ..., "source": ...}` object a line, one document
  (chunk) each, in source order;
- `manifest.json`: per-source license, provenance, document/byte/duplicate counts, and the size
  and sha256 of each output file;
and returns the manifest as a dict. Pipeline per document: light normalisation -> split into
chunks of at most `max_chars` at paragraph, then line, boundaries -> exact-duplicate removal
(sha256 of the chunk with whitespace runs collapsed; the first copy wins) -> split by hash.
The split depends only on a chunk's text and the seed, never on order or on the other chunks, so
adding a source never moves an existing chunk between train and val.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from blockdiff.train.sources import Source, ensure_available

SPLITS = ("train", "val")


@dataclass(frozen=True)
class CorpusConfig:
    val_fraction: float = 0.01
    seed: int = 0
    max_chars: int = 4096  # a chunk is a few hundred to a thousand tokens: many windows per doc
    min_chars: int = 1  # keep short fortunes; raise to drop headings and stray lines

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_chars < 64 or not 1 <= self.min_chars <= self.max_chars:
            raise ValueError(f"need 64 <= max_chars and 1 <= min_chars <= max_chars, got {self}")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 (but \t, \n), DEL and C1 controls
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.M)
_BLANK_RUN = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """Light, meaning-preserving clean-up: NFC, Unix newlines, no control characters, no
    trailing spaces, at most one blank line in a row, no leading/trailing blank lines.
    Indentation and line breaks stay (verse, code and reST depend on them)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("", _CONTROL.sub("", text))
    return _BLANK_RUN.sub("\n\n", text).strip("\n")


def _pieces(text: str, max_chars: int) -> Iterator[tuple[str, str]]:
    """Yield (separator, piece): the separator is what joined the piece to the one before it
    in the original text, so chunks keep the original layout. Paragraphs first; a paragraph
    longer than max_chars is cut at line ends, and a line longer than that is cut hard (rare:
    only unwrapped prose or data)."""
    for para in text.split("\n\n"):
        if len(para) <= max_chars:
            yield "\n\n", para
            continue
        for j, line in enumerate(para.split("\n")):
            for i in range(0, max(len(line), 1), max_chars):
                yield ("\n\n" if j == 0 else "\n") if i == 0 else "", line[i : i + max_chars]


def chunk_document(text: str, max_chars: int) -> list[str]:
    """Greedily pack consecutive pieces into chunks of at most max_chars."""
    chunks, current = [], ""
    for sep, piece in _pieces(text, max_chars):
        if not piece.strip():
            continue
        candidate = current + sep + piece if current else piece
        if len(candidate) <= max_chars:
            current = candidate
        else:
            chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


def dedup_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def is_validation(key: str, val_fraction: float, seed: int) -> bool:
    """Deterministic held-out split: a chunk is in val when its seeded hash falls below the
    fraction. Hash of (seed, dedup key), so exact duplicates can never straddle the split."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") < val_fraction * 2**64


@dataclass
class SourceStats:
    name: str
    license: str
    obtained: str
    documents: int = 0  # as the reader yielded them
    chunks: int = 0  # after chunking, before dedup
    duplicates: int = 0  # chunks dropped as exact duplicates of an earlier chunk
    too_short: int = 0
    train_docs: int = 0
    val_docs: int = 0
    train_bytes: int = 0
    val_bytes: int = 0


def _file_info(path: Path, docs: int) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"docs": docs, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_source(source: Source, documents: Iterable[str], config: CorpusConfig, seen: set[str],
                  files: dict) -> SourceStats:
    stats = SourceStats(source.name, source.license, source.obtained)
    for doc in documents:
        stats.documents += 1
        for chunk in chunk_document(normalize_text(doc), config.max_chars):
            stats.chunks += 1
            if len(chunk) < config.min_chars:
                stats.too_short += 1
                continue
            key = dedup_key(chunk)
            if key in seen:
                stats.duplicates += 1
                continue
            seen.add(key)
            split = "val" if is_validation(key, config.val_fraction, config.seed) else "train"
            line = json.dumps({"text": chunk, "source": source.name}, ensure_ascii=False) + "\n"
            files[split].write(line)
            setattr(stats, f"{split}_docs", getattr(stats, f"{split}_docs") + 1)
            setattr(stats, f"{split}_bytes", getattr(stats, f"{split}_bytes") + len(chunk.encode()))
    return stats


def build_corpus(out_dir: str | Path, sources: list[Source], config: CorpusConfig = CorpusConfig(),
                 cache_dir: str | Path = ".", install: bool = False) -> dict:
    """Read, clean, chunk, dedup and split `sources` into `out_dir`; return the manifest."""
    if not sources:
        raise ValueError("build_corpus needs at least one source")
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    for source in sources:  # fail before writing anything if a source is missing
        ensure_available(source, cache_dir, install)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    stats = []
    paths = {s: out_dir / f"{s}.jsonl" for s in SPLITS}
    files = {s: p.open("w", encoding="utf-8") for s, p in paths.items()}
    try:
        for source in sources:
            docs = tqdm(source.read(cache_dir), desc=f"read {source.name}", unit="doc", leave=False)
            stats.append(_write_source(source, docs, config, seen, files))
    finally:
        for f in files.values():
            f.close()
    manifest = {
        "config": asdict(config),
        "sources": [asdict(s) for s in stats],
        "totals": {k: sum(getattr(s, k) for s in stats) for k in
                   ("documents", "chunks", "duplicates", "too_short", "train_docs", "val_docs",
                    "train_bytes", "val_bytes")},
        "files": {p.name: _file_info(p, sum(getattr(s, f"{split}_docs") for s in stats))
                  for split, p in paths.items()},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_documents(corpus_dir: str | Path, split: str) -> Iterator[str]:
    """Iterate over the texts of one split written by build_corpus. Checks the file now, not
    at the first `next()`, so a bad path fails where it was passed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(corpus_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path} (run build_corpus first)")
    return _texts(path)


def _texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
