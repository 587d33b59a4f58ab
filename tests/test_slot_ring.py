"""KV cache ring for sliding layers (long contexts): same tokens as the full-length cache and the
reference, prefix reuse stays exact, and the ring is only as long as the window needs."""
import pytest
import torch
from hf_oracle import CONFIGS
from test_engine import check_against_reference

import blockdiff
from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.model import slot_cache
from blockdiff.model.slot_cache import SlotCache, ring_length


@pytest.fixture
def ring_always(monkeypatch):
    monkeypatch.setattr(slot_cache, "RING_MIN_LEN", 0)


def test_ring_only_for_long_contexts():
    cfg = blockdiff.ModelConfig(**CONFIGS["spec"])
    ring = cfg.sliding_window - 1 + cfg.canvas_length
    assert ring_length(cfg, 2048) is None                    # short contexts keep every position
    assert ring_length(cfg, slot_cache.RING_MIN_LEN) == ring
    cache = SlotCache(cfg, 2, slot_cache.RING_MIN_LEN, torch.float32, "cpu")
    for layer, kind in enumerate(cfg.layer_types):
        assert cache.k[layer].shape[1] == (slot_cache.RING_MIN_LEN if kind == "full_attention" else ring)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ring_engine_equals_reference(hf_dirs, ring_always, temperature):
    """Prompt longer than the window and three canvases: the ring wraps several times."""
    _, path = hf_dirs["spec"]
    c, w = CONFIGS["spec"]["canvas_length"], CONFIGS["spec"]["sliding_window"]
    llm = LLM(blockdiff.load_model(path), tokenizer=None, max_model_len=512)
    assert llm.runner.cache.ring == w - 1 + c
    check_against_reference(llm, list(range(3, 3 + 2 * w + 5)), temperature)


def test_ring_prefix_reuse_and_batch(hf_dirs, monkeypatch):
    """Siblings (n > 1), a repeated prompt after a long request, and rows of other lengths in one
    batch give the tokens of the full-length cache."""
    _, path = hf_dirs["spec"]
    model = blockdiff.load_model(path)
    prompts = [list(range(3, 40)), list(range(3, 40)), list(range(7, 12)), list(range(3, 40)) + [5, 6]]
    sp = [SamplingParams(max_tokens=n, seed=i, max_denoising_steps=3, ignore_eos=True)
          for i, n in enumerate((30, 30, 20, 25))]
    runs = []
    for ring in (False, True):
        monkeypatch.setattr(slot_cache, "RING_MIN_LEN", 0 if ring else 10**9)
        llm = LLM(model, tokenizer=None, max_num_seqs=3, max_model_len=512)
        assert (llm.runner.cache.ring is not None) == ring
        first = [o.token_ids for o in llm.generate(prompts, sp)]
        again = [o.token_ids for o in llm.generate(prompts[:1], sp[:1])]       # a free slot's prefix
        runs.append((first, again))
    assert runs[0] == runs[1]
