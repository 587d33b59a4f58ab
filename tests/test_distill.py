"""`blockdiff distill`: an AR teacher's samples as a training set (tiny random teacher, tiny corpus)."""
import json

import numpy as np
import pytest

from blockdiff.cli import main
from blockdiff.random_model import create_random_model
from blockdiff.train.corpus import CorpusConfig, build_corpus
from blockdiff.train.data import TokenDataset, tokenize_corpus, train_tokenizer
from blockdiff.train.distill import DistillConfig, distill
from blockdiff.train.sources import Source

TEXT = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
        f"in want of a wife. Chapter {i}." for i in range(60)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    corpus = root / "corpus"
    build_corpus(corpus, [Source("fake", "CC0", "test", lambda c: iter(TEXT))], CorpusConfig(val_fraction=0.2))
    train_tokenizer(corpus, corpus / "tokenizer", vocab_size=261)      # the random teacher's vocabulary size
    tokenize_corpus(corpus, corpus / "tokenizer")
    return corpus, create_random_model(root / "teacher", seed=2)


def config(setup, out, tokens):
    corpus, teacher = setup
    return DistillConfig(str(teacher), str(corpus), str(out), tokens=tokens, prompt_tokens=6, new_tokens=10, batch=4)


def test_documents_are_prompt_then_teacher_and_val_stays_real(setup, tmp_path):
    corpus, _ = setup
    meta = distill(config(setup, tmp_path / "d", 100))
    ids = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    assert ids.size == meta["splits"]["train"]["tokens"] >= 100
    assert ids[0] == meta["bos_id"] and ids[-1] == meta["eos_id"]
    docs = np.split(ids, np.flatnonzero(ids == meta["bos_id"])[1:])
    assert len(docs) == meta["splits"]["train"]["docs"] and all(7 + 1 <= len(d) <= 1 + 6 + 10 + 1 for d in docs)
    assert (tmp_path / "d" / "val.bin").read_bytes() == (corpus / "val.bin").read_bytes()
    assert TokenDataset(tmp_path / "d").get_batch("train", 2, 16).shape == (2, 16)    # what the trainer reads


def test_an_interrupted_run_continues_exactly(setup, tmp_path):
    distill(config(setup, tmp_path / "whole", 150))
    distill(config(setup, tmp_path / "split", 60))
    distill(config(setup, tmp_path / "split", 150))
    assert (tmp_path / "split" / "train.bin").read_bytes() == (tmp_path / "whole" / "train.bin").read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        distill(DistillConfig(**{**vars(config(setup, tmp_path / "split", 150)), "temperature": 0.1}))


def test_cli_prints_json_last(setup, tmp_path, capsys):
    corpus, teacher = setup
    argv = ["distill", "--teacher", str(teacher), "--corpus", str(corpus), "--out", str(tmp_path / "c"),
            "--tokens", "40", "--prompt-tokens", "4", "--new-tokens", "8", "--batch", "2"]
    assert main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["train_tokens"] >= 40 and last["tok_s"] > 0
    assert main(argv[:-2] + ["--batch", "0"]) == 2                           # one-line error, exit 2
