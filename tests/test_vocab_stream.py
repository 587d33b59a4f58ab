"""The vocabulary-streamed denoising step against the materialised one and the reference.

Logits, softcap, temperature and argmax are bit-equal on both sides; normalisers, entropies, block
sums and the soft embedding add in another order (compared within rounding); sampled tokens are
equal under the same noise (a draw could only differ within rounding of a cumulative boundary).
"""
import pytest
import torch
from hf_oracle import CONFIGS
from test_engine import reference_ids

import blockdiff
from blockdiff.bench import PeakMemory
from blockdiff.diffusion.sampler import RowKnobs, _filter_top, denoise_rows
from blockdiff.diffusion.vocab_stream import Head
from blockdiff.diffusion.vocab_top import sortable_key, top_threshold
from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.model.init import init_weights
from blockdiff.model.transformer import DiffusionGemma
from blockdiff.random_model import tiny_config

# (temperature scale, greedy, top_k, top_p) per row: sampled, greedy, top-k, top-p, both, flat top-p
ROWS = [(1.0, False, 0, 1.0), (1.0, True, 0, 1.0), (1.0, False, 20, 1.0), (0.7, False, 0, 0.9),
        (1.0, False, 50, 0.5), (1.3, False, 0, 0.95)]


def tiny_model(vocab: int, dtype=torch.float32) -> DiffusionGemma:
    cfg = tiny_config(vocab_size=vocab, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    return init_weights(DiffusionGemma(cfg), seed=0).to(dtype).eval()


def knobs(rows) -> RowKnobs:
    n = len(rows)
    col = lambda i, dtype: torch.tensor([r[i] for r in rows], dtype=dtype)     # noqa: E731
    full = lambda v, dtype: torch.full((n,), v, dtype=dtype)                  # noqa: E731
    return RowKnobs(max_denoising_steps=full(4, torch.int64), t_min=full(0.4, torch.float32),
                    t_span=full(0.4, torch.float32), temp_scale=col(0, torch.float32), greedy=col(1, torch.bool),
                    entropy_bound=full(0.5, torch.float32), confidence_threshold=full(1.0, torch.float32),
                    stability_threshold=full(0, torch.int64), fixed_steps=full(False, torch.bool),
                    top_k=col(2, torch.int64), top_p=col(3, torch.float32), seed=torch.arange(n) + 7)


def step_both_ways(model, hidden, use_k: bool, use_p: bool):
    r, c = hidden.shape[:2]
    k, step, canvas = knobs(ROWS[:r]), torch.arange(r) % 4, torch.arange(r) % 3
    history = torch.full((r, 1, c), -1)
    with torch.no_grad():
        full, _ = denoise_rows(model, hidden, k, step, canvas, history, 2**30, use_k, use_p, stream=False)
        # a 64 KB budget: tiles of 64 tokens (a partial last block for vocab 1000), one gathered block per chunk
        streamed, _ = denoise_rows(model, hidden, k, step, canvas, history, 2**16, use_k, use_p, stream=True)
    return full, streamed


@pytest.mark.parametrize("vocab", [1000, 2048])
@pytest.mark.parametrize("top", [False, True])
def test_streamed_step_equals_materialised(vocab, top):
    """Sampled, greedy, top-k, top-p and top-k + top-p rows in one batch, peaked and flat rows."""
    model = tiny_model(vocab)
    gen = torch.Generator().manual_seed(vocab)
    scale = torch.tensor([20.0, 20.0, 20.0, 20.0, 20.0, 2.0])[:, None, None]    # the last row near uniform
    hidden = torch.randn(len(ROWS), 16, 64, generator=gen) * scale
    full, streamed = step_both_ways(model, hidden, top, top)
    assert torch.equal(streamed.argmax, full.argmax)
    assert torch.equal(streamed.next_canvas, full.next_canvas)
    assert torch.equal(streamed.accept, full.accept) and torch.equal(streamed.stop, full.stop)
    assert torch.allclose(streamed.max_prob, full.max_prob, rtol=1e-5, atol=1e-7)
    assert torch.allclose(streamed.soft, full.soft, rtol=1e-4, atol=1e-5 * full.soft.abs().max())


def test_streamed_step_bf16_follows_materialised():
    """bf16 weights (softcap by table on both sides): the same argmax; max probability and soft
    embedding within bf16 rounding (the soft embedding rounds its tile products to bf16)."""
    model = tiny_model(1000, torch.bfloat16)
    hidden = (torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(1)) * 20).bfloat16()
    full, streamed = step_both_ways(model, hidden, False, False)
    assert torch.equal(streamed.argmax, full.argmax)
    assert torch.allclose(streamed.max_prob, full.max_prob, rtol=1e-4, atol=1e-6)
    assert ((streamed.soft.float() - full.soft.float()).norm() / full.soft.float().norm()) < 2e-2
    assert (streamed.next_canvas == full.next_canvas).float().mean() > 0.9


def materialised_kept(y: torch.Tensor, top_k, top_p) -> torch.Tensor:
    return _filter_top(y[:, None], top_k, top_p, True, True)[:, 0].isfinite()


@pytest.mark.parametrize("spread", [0.3, 3.0, 30.0])          # near uniform .. a few tokens hold the mass
def test_top_threshold_keeps_the_materialised_set(spread):
    """Top-k, top-p, both and neither: the radix threshold keeps the tokens the sort-based filter
    keeps. A run of equal logits at the k-th is kept whole by both; at a top-p boundary inside such
    a run the threshold keeps the whole run, the sort whichever part its order puts first."""
    gen = torch.Generator().manual_seed(int(spread * 10))
    w = torch.randn(700, 32, generator=gen)
    tied = torch.zeros(700, dtype=torch.bool)
    tied[5] = tied[100:111] = True
    w[tied] = w[5].clone()                                 # twelve tokens with equal logits
    h = torch.randn(8, 32, generator=gen) * spread / 6
    head, temp = Head(w, 30.0, None), torch.full((8,), 0.6)
    y = head.process(torch.mm(h, w.t()), temp)
    k_at_tie = int((y[2] > y[2, 5]).sum()) + 1             # row 2: the k-th largest logit is the tied one
    top_k = torch.tensor([0, 3, k_at_tie, 0, 0, 25, 700, 1])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.95, 0.8, 0.3, 0.9])
    tau = top_threshold(head, h, temp, y.amax(-1), 128, top_k, top_p, True, True)
    kept = sortable_key(y) >= tau[:, None]
    ref = materialised_kept(y, top_k, top_p)
    assert torch.equal(kept[:, ~tied], ref[:, ~tied])
    assert (kept[:, tied].all(-1) | ~kept[:, tied].any(-1)).all() and (kept | ~ref).all()
    assert kept[0].all() and kept[1].sum() == 3 and kept[2].sum() == k_at_tie + 11 == ref[2].sum()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_streamed_equals_reference(hf_dirs, name, temperature):
    """With the vocabulary streamed (a sampler budget too small for one materialised row: tiles of
    128-512 tokens, the last one partial for vocabularies 300 and 1000), the engine still gives the
    reference's tokens under the same draws."""
    _, path = hf_dirs[name]
    llm = LLM(blockdiff.load_model(path), tokenizer=None, sampler_memory_mb=0.07)
    c, w = CONFIGS[name]["canvas_length"], CONFIGS[name]["sliding_window"]
    prompt = list(range(3, 3 + w + 5))
    sp = SamplingParams(max_tokens=3 * c - 1, seed=17, max_denoising_steps=4, temperature=temperature,
                        ignore_eos=True, confidence_threshold=100.0, stability_threshold=1)
    out = llm.generate([prompt], sp)[0]
    ids, steps = reference_ids(llm.model, prompt, sp)
    assert out.token_ids == ids and out.stats.steps_per_canvas == steps


def test_streamed_memory_does_not_grow_with_the_vocabulary():
    """8 rows x canvas 16 on a 262,144-token vocabulary under a 16 MB budget: the step's peak live
    memory stays under the budget, where one fp32 logits tensor of the batch is 128 MB."""
    cfg = tiny_config(vocab_size=262144, hidden_size=32, head_dim=16, global_head_dim=16, num_hidden_layers=1,
                      layer_types=["full_attention"])
    model = init_weights(DiffusionGemma(cfg), seed=0).eval()
    r, zeros = 8, torch.zeros(8, dtype=torch.long)
    with torch.no_grad(), PeakMemory("cpu") as mem:
        out, _ = denoise_rows(model, torch.randn(r, 16, 32), knobs([ROWS[0]] * r), zeros, zeros,
                              torch.full((r, 1, 16), -1), 16 << 20)
    assert out.argmax.shape == (r, 16) and (out.next_canvas < 262144).all()
    assert mem.mb < 16
