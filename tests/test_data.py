"""Data pipeline: source parsing, corpus build (clean, chunk, dedup, split), tokenizer training,
token bins, random-window batches and the `data` CLI. Fake sources only: no apt packages needed."""
import hashlib
import json
import random
import struct
import sys
import zlib

import numpy as np
import pytest
import torch

from blockdiff.tokenizer import Tokenizer
from blockdiff.train import rdata, sources
from blockdiff.train.corpus import CorpusConfig, build_corpus, chunk_document, is_validation, normalize_text
from blockdiff.cli import build_parser
from blockdiff.train.data import TokenDataset, token_dtype, tokenize_corpus, train_tokenizer
from blockdiff.train.sources import Source, SourceUnavailable

WORDS = "the of and to in a is that was he for it with as his on be at by had not are but from".split()


def make_docs(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + f" doc{i}." for i in range(n)]


def fake_source(docs, name="fake"):
    return Source(name, "CC0", "made up in a test", lambda cache: iter(docs))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A built corpus + 400-token tokenizer + bins, shared by the tokenizer and batch tests."""
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, [fake_source(make_docs(400))], CorpusConfig(val_fraction=0.1))
    train_tokenizer(out, out / "tokenizer", vocab_size=400)
    tokenize_corpus(out, out / "tokenizer")
    return out


# --- text helpers ------------------------------------------------------------------------------

def test_normalize_text_cleans_whitespace_and_controls():
    assert normalize_text("\n\nA  \r\nb\x07\x85\n\n\n\n\tc\n") == "A\nb\n\n\tc"


def test_chunks_respect_max_chars_and_keep_layout():
    text = "\n\n".join(f"para {i}\nline two of {i}" for i in range(50))
    chunks = chunk_document(text, 100)
    assert all(len(c) <= 100 for c in chunks)
    assert "\n\n".join(chunks) == text


def test_long_paragraph_splits_at_line_ends():
    verses = "\n".join(f"verse {i} " + "x" * 30 for i in range(20))
    assert "\n".join(chunk_document(verses, 100)) == verses


def test_overlong_line_is_cut_hard():
    assert chunk_document("y" * 250, 100) == ["y" * 100, "y" * 100, "y" * 50]


def test_split_fortunes_removes_separators_and_overstrike():
    text = "First one.\n%\nB\bBold and _\bu_\bn_\bd_\be_\br.\n%\n\n%\n"
    assert sources.split_fortunes(text) == ["First one.", "Bold and under."]


@pytest.mark.parametrize("broken", ["don\u00e2\x80\x99t", "don\u00c3\u00a2\u00c2\x80\u00c2\x99t"],
                         ids=["once", "twice"])
def test_repair_mojibake_fixes_misdecoded_utf8(broken):
    assert sources.repair_mojibake(broken) == "don\u2019t"


def test_repair_mojibake_leaves_clean_text_alone():
    assert sources.repair_mojibake("café ÃŸ") == "café ÃŸ"


def test_parse_bible_groups_chapters_and_strips_refs():
    lines = ["Ge1:1 In the beginning.", "Ge1:2 And the earth", "  was void.", "Ge2:1 Thus.", "1Sa1:1 Now."]
    assert sources.parse_bible(lines) == ["In the beginning.\nAnd the earth was void.", "Thus.", "Now."]


def test_strip_gutenberg_keeps_only_the_book():
    text = ("Header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody.\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicence")
    assert sources.strip_gutenberg(text).strip() == "Body."


# --- R lazy-load reader --------------------------------------------------------------------------

def _xdr_named_strings(mapping):
    """Serialize a named R character vector the way `serialize(xdr=TRUE)` does (version 2)."""
    def chars(s):
        b = s.encode()
        return struct.pack(">ii", 0x00040009, len(b)) + b
    out = b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300)
    out += struct.pack(">ii", 16 | 1 << 9, len(mapping)) + b"".join(chars(v) for v in mapping.values())
    out += struct.pack(">i", 2 | 1 << 10) + struct.pack(">i", 1) + chars("names")  # attr pairlist
    out += struct.pack(">ii", 16, len(mapping)) + b"".join(chars(k) for k in mapping)
    return out + struct.pack(">i", 254)


def test_unserialize_named_character_vector():
    assert rdata.unserialize(_xdr_named_strings({"a": "x", "b": "é"})) == {"a": "x", "b": "é"}


def test_lazyload_db_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="Rdata.rdx"):
        rdata.read_lazyload_db(tmp_path)


def test_lazyload_db_reads_zlib_blobs(tmp_path):
    blob = _xdr_named_strings({"l1": "It is a truth"})
    record = struct.pack(">i", len(blob)) + zlib.compress(blob)
    (tmp_path / "Rdata.rdb").write_bytes(record)
    # The index: variables = list(novel = c(offset, length)), compressed = TRUE
    idx = b"X\n" + struct.pack(">iii", 2, 0, 0) + struct.pack(">ii", 19 | 1 << 9, 2)
    idx += struct.pack(">ii", 19 | 1 << 9, 1) + struct.pack(">iiii", 13, 2, 0, len(record))
    idx += struct.pack(">ii", 2 | 1 << 10, 1) + struct.pack(">ii", 0x00040009, 5) + b"names"
    idx += struct.pack(">ii", 16, 1) + struct.pack(">ii", 0x00040009, 5) + b"novel" + struct.pack(">i", 254)
    idx += struct.pack(">iii", 10, 1, 1)
    idx += struct.pack(">ii", 2 | 1 << 10, 255 | 1 << 8)  # names symbol as a back-reference
    idx += struct.pack(">ii", 16, 2) + struct.pack(">ii", 0x00040009, 9) + b"variables"
    idx += struct.pack(">ii", 0x00040009, 10) + b"compressed" + struct.pack(">i", 254)
    (tmp_path / "Rdata.rdx").write_bytes(struct.pack(">i", len(idx)) + zlib.compress(idx))
    assert rdata.read_lazyload_db(tmp_path) == {"novel": {"l1": "It is a truth"}}


# --- corpus build --------------------------------------------------------------------------------

def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_exact_duplicates_removed_and_counted(tmp_path):
    docs = ["alpha beta", "gamma", "alpha   beta", "gamma", "delta"]
    m = build_corpus(tmp_path, [fake_source(docs)], CorpusConfig(val_fraction=0.0))
    assert [d["text"] for d in _lines(tmp_path / "train.jsonl")] == ["alpha beta", "gamma", "delta"]
    assert m["totals"]["duplicates"] == 2


def test_duplicates_across_sources_keep_first(tmp_path):
    m = build_corpus(tmp_path, [fake_source(["same"], "a"), fake_source(["same"], "b")],
                     CorpusConfig(val_fraction=0.0))
    assert [s["duplicates"] for s in m["sources"]] == [0, 1]


def test_split_is_deterministic_and_order_independent(tmp_path):
    docs = make_docs(300)
    build_corpus(tmp_path / "a", [fake_source(docs)], CorpusConfig(val_fraction=0.2))
    build_corpus(tmp_path / "b", [fake_source(docs[::-1])], CorpusConfig(val_fraction=0.2))
    val_a = {d["text"] for d in _lines(tmp_path / "a" / "val.jsonl")}
    assert val_a == {d["text"] for d in _lines(tmp_path / "b" / "val.jsonl")}


def test_val_fraction_is_roughly_respected():
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    assert 150 < sum(is_validation(k, 0.1, seed=0) for k in keys) < 250


def test_seed_changes_the_split():
    keys = [str(i) for i in range(200)]
    assert [is_validation(k, 0.5, 0) for k in keys] != [is_validation(k, 0.5, 1) for k in keys]


def test_manifest_records_file_hashes_and_counts(corpus):
    m = json.loads((corpus / "manifest.json").read_text())
    for split in ("train", "val"):
        info = m["files"][f"{split}.jsonl"]
        assert info["sha256"] == hashlib.sha256((corpus / f"{split}.jsonl").read_bytes()).hexdigest()
        assert info["docs"] == len(_lines(corpus / f"{split}.jsonl")) == m["totals"][f"{split}_docs"]


def test_missing_source_names_install_command(tmp_path):
    src = Source("ghost", "?", "?", lambda c: iter(["x"]), probe=lambda c: False,
                 install=(("apt-get", "install", "-y", "ghost-pkg"),))
    with pytest.raises(SourceUnavailable, match="apt-get install -y ghost-pkg"):
        build_corpus(tmp_path / "out", [src])
    assert not (tmp_path / "out").exists()


def test_install_flag_runs_install_command(tmp_path):
    cmd = (sys.executable, "-c", "open(r'{cache}/marker', 'w').close()")
    src = Source("local", "?", "?", lambda c: iter(["text"]), probe=lambda c: (c / "marker").exists(),
                 install=(cmd,))
    build_corpus(tmp_path / "out", [src], cache_dir=tmp_path / "cache", install=True)
    assert (tmp_path / "cache" / "marker").exists()


def test_unknown_source_name_is_rejected():
    with pytest.raises(ValueError, match="unknown source"):
        sources.get_sources(["austen", "klingon"])


# --- tokenizer and bins --------------------------------------------------------------------------

def test_trained_tokenizer_has_special_ids_0_to_4(corpus):
    tok = Tokenizer.from_dir(corpus / "tokenizer")
    ids = [tok.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")]
    assert ids == [0, 1, 2, 3, 4] and (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)


def test_trained_tokenizer_round_trips_text(corpus):
    tok = Tokenizer.from_dir(corpus / "tokenizer")
    text = "the dog was at the café 🎉\n\tindented"
    assert tok.decode(tok.encode(text)) == text


def test_bins_hold_every_document_between_bos_and_eos(corpus):
    meta = json.loads((corpus / "meta.json").read_text())
    tok = Tokenizer.from_dir(corpus / "tokenizer")
    train = np.fromfile(corpus / "train.bin", dtype=meta["dtype"])
    assert train.size == meta["splits"]["train"]["tokens"]
    docs = [d["text"] for d in _lines(corpus / "train.jsonl")]
    ends = np.flatnonzero(train == tok.eos_id)
    assert len(ends) == len(docs) and train[0] == tok.bos_id
    assert tok.decode(train[1 : ends[0]].tolist()) == docs[0]


def test_token_dtype_widens_for_big_vocab():
    assert (token_dtype(8192), token_dtype(65536), token_dtype(70000)) == (np.uint16, np.uint16, np.uint32)


def test_train_tokenizer_missing_corpus_error_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        train_tokenizer(tmp_path, tmp_path / "tok", vocab_size=300)


# --- batches ---------------------------------------------------------------------------------------

def test_get_batch_shape_and_dtype(corpus):
    x = TokenDataset(corpus).get_batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and x.dtype == torch.long


def test_get_batch_is_deterministic_given_generator(corpus):
    ds = TokenDataset(corpus)
    a = ds.get_batch("val", 3, 8, torch.Generator().manual_seed(7))
    b = ds.get_batch("val", 3, 8, torch.Generator().manual_seed(7))
    c = ds.get_batch("val", 3, 8, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_get_batch_rows_are_contiguous_windows(corpus):
    ds = TokenDataset(corpus)
    data = torch.from_numpy(ds.tokens("train").astype(np.int64))
    row = ds.get_batch("train", 1, 32, torch.Generator().manual_seed(1))[0]
    windows = data.unfold(0, 32, 1)
    assert (windows == row).all(dim=1).any()


def test_get_batch_rejects_too_long_windows(corpus):
    with pytest.raises(ValueError, match="seq_len"):
        TokenDataset(corpus).get_batch("val", 1, 10**9)


def test_dataset_missing_meta_error_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenDataset(tmp_path)


# --- CLI -------------------------------------------------------------------------------------------

def _parser():
    return build_parser()


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "--help"])
    help_text = capsys.readouterr().out
    for opt in ("--out", "--sources", "--vocab-size", "--val-fraction", "--seed", "--cache-dir", "--install"):
        assert opt in help_text


def test_cli_runs_whole_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sources.SOURCES, "fake", fake_source(make_docs(200)))
    args = _parser().parse_args(["data", "--out", str(tmp_path), "--sources", "fake", "--vocab-size", "300"])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "meta.json").read_text())["vocab_size"] == 300
    assert "tokens:" in capsys.readouterr().out
