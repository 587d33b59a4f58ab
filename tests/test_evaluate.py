"""`blockdiff eval` plumbing on a tiny random model, with a small real judge (a character unigram LM
fitted on the validation text) in place of SmolLM2."""
import json
import math
from collections import Counter

import numpy as np

from blockdiff.engine.request import SamplingParams
from blockdiff.random_model import create_random_model
from blockdiff.tokenizer import Tokenizer
import blockdiff
from blockdiff.train.evaluate import distinct_ngram_ratio, evaluate, short_answers, top1_agreement

TEXT = ["It is a truth universally acknowledged that a single man must be in want of a wife. " * 3,
        "In the beginning God created the heaven and the earth, and the earth was without form. " * 3,
        "The quality of mercy is not strained; it droppeth as the gentle rain from heaven. " * 3]


class UnigramJudge:
    def __init__(self, texts):
        self.counts = Counter("".join(texts))
        self.total = sum(self.counts.values())

    def perplexity(self, texts):
        chars = "".join(texts)
        nll = -sum(math.log((self.counts[c] + 1) / (self.total + 256)) for c in chars)
        return math.exp(nll / len(chars))


def test_evaluate_reports_losses_judge_and_speed(tmp_path):
    model = create_random_model(tmp_path / "m", seed=1)
    ar_model = create_random_model(tmp_path / "ar", seed=2)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    tok = Tokenizer.from_dir(model)
    (corpus / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    ids = np.array(sum((tok.encode(t) + [1] for t in TEXT), []), dtype=np.uint16)
    ids.tofile(corpus / "val.bin")
    ids.tofile(corpus / "train.bin")
    (corpus / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 261, "bos_id": 2, "eos_id": 1}))
    judge = UnigramJudge(TEXT)
    res = evaluate(model, corpus, judge, ar_model_dir=ar_model, samples=3, max_tokens=16, val_batches=2,
                   params=SamplingParams(max_denoising_steps=2), fast_steps=1, reference_dir=model)
    assert res["samples"] == 3
    # random weights write noise: the judge must find real text far more likely than the samples
    assert res["judge_ppl_real"] < res["judge_ppl_diffusion"] and res["judge_ppl_real"] < res["judge_ppl_ar"]
    assert 4.0 < res["val_decoder_loss"] < 7.0 and 4.0 < res["ar_val_encoder_loss"] < 7.0    # ~ln(261) = 5.56
    assert res["diffusion_tok_s"] > 0 and res["ar_tok_s"] > 0
    assert res["fast_steps"] == 1 and res["diffusion_tok_s_fast"] > 0 and res["judge_ppl_diffusion_fast"] > 0
    assert res["steps"] == 2 and res["sampler"]["max_denoising_steps"] == 2
    assert 1.0 <= res["diffusion_steps_per_canvas"] <= 2.0
    # the model against itself: the same loss, every prediction shared; against another, few shared
    assert res["reference_val_decoder_loss"] == res["val_decoder_loss"] and res["val_top1_agreement"] == 1.0
    other = top1_agreement(blockdiff.load_model(model), blockdiff.load_model(ar_model), corpus, 2, 64)
    assert other < 0.5
    # every row reports its variety
    for row in ("real", "diffusion", "diffusion_fast", "ar"):
        assert 0.0 <= res[f"distinct3_{row}"] <= 1.0 and res[f"short_{row}"] in range(4), row


def test_distinct_ngrams_count_repetition():
    assert distinct_ngram_ratio(["the cat sat on the mat"]) == 1.0
    assert distinct_ngram_ratio(["a b c a b c a b c"]) == 3 / 7
    assert distinct_ngram_ratio(["a b c", "a b c"]) == 0.5          # across texts too
    assert distinct_ngram_ratio(["a b", ""]) == 0.0                  # no 3-gram at all
    assert short_answers(["", ".", "one", "two words", "."]) == 4
