"""Log-probabilities of committed tokens: the math, the engine's per-token entries, batch independence.

The reference is a direct `log_softmax` of the final step's processed logits, softcap(h E^T) / T.
"""
import math

import pytest
import torch

from blockdiff.bench import PeakMemory
from blockdiff.diffusion.logprobs import committed_logprobs
from blockdiff.diffusion.sampler import processed_logits
from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.model.init import init_weights
from blockdiff.model.transformer import DiffusionGemma
from blockdiff.random_model import create_random_model, tiny_config


def tiny_model(vocab: int, dtype=torch.float32) -> DiffusionGemma:
    cfg = tiny_config(vocab_size=vocab, num_hidden_layers=1, layer_types=["full_attention"])
    return init_weights(DiffusionGemma(cfg), seed=0).to(dtype).eval()


def direct(model, hidden, temp, ids, n):
    proc = processed_logits(hidden @ model.embed_tokens.weight.t(), temp, model.config.final_logit_softcapping)
    proc = proc.float().flatten(0, 1)
    logp, at = torch.log_softmax(proc, -1), ids.reshape(-1, 1)
    order = torch.sort(proc, dim=-1, descending=True, stable=True).indices[:, :n]   # ties: lower id first
    return logp, logp.gather(1, at).squeeze(1), 1 + (proc > proc.gather(1, at)).sum(-1), order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_and_materialised_equal_a_direct_log_softmax(dtype):
    """Argmax commits and arbitrary commits (ranks past the top-N: the counting pass), three rows
    with their own temperatures, a vocabulary that the 64 KB streamed tiles do not divide."""
    model = tiny_model(1000, dtype)
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(3, 8, model.config.hidden_size, generator=gen) * 4).to(dtype)
    temp = torch.tensor([0.4, 0.8, 1.3])
    logp = direct(model, hidden, temp, torch.zeros(3, 8, dtype=torch.long), 0)[0]
    argmax = logp.argmax(-1).view(3, 8)
    other = torch.randint(0, 1000, (3, 8), generator=gen)
    for ids in (argmax, other):
        logp, chosen, rank, order = direct(model, hidden, temp, ids, 5)
        with torch.no_grad():
            for stream in (False, True):
                got = committed_logprobs(model, hidden, temp, ids, 5, 2**16, stream=stream)
                torch.testing.assert_close(got.logprob, chosen, atol=1e-5, rtol=0)
                assert torch.equal(got.rank, rank)
                assert torch.equal(got.top_ids, order)
                torch.testing.assert_close(got.top_logprobs, logp.gather(1, order), atol=1e-5, rtol=0)
    assert (rank > 5).any()                          # the arbitrary commits did exercise the counting pass


def test_no_alternatives_and_the_argmax_has_rank_one():
    model = tiny_model(300)
    hidden = torch.randn(2, 4, model.config.hidden_size)
    temp = torch.tensor([0.5, 1.0])
    logp = direct(model, hidden, temp, torch.zeros(2, 4, dtype=torch.long), 0)[0]
    ids = logp.argmax(-1).view(2, 4)
    with torch.no_grad():
        for stream in (False, True):
            got = committed_logprobs(model, hidden, temp, ids, 0, 2**16, stream=stream)
            assert got.top_ids.shape == (8, 0) and torch.equal(got.rank, torch.ones(8, dtype=torch.long))
            torch.testing.assert_close(got.logprob, logp.amax(-1), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("logprobs") / "m", seed=2)


LP = dict(max_denoising_steps=4, ignore_eos=True, logprobs=3)


def run_with_frames(llm, prompt, params):
    """The finished output and, per canvas, the max_prob of its last denoising step."""
    rid = llm.add_request(prompt, params, frames=True)
    last, out = {}, None
    while out is None:
        for o in llm.step():
            out = o if o.request_id == rid and o.finished else out
        last.update({f.canvas: f.max_prob for f in llm.frames})
    return out, [p for c in sorted(last) for p in last[c]]


def test_one_entry_per_token_and_the_argmax_probability_is_max_prob(model_dir):
    llm = LLM(model_dir, max_num_seqs=4)
    out, max_prob = run_with_frames(llm, [5, 6, 7], SamplingParams(max_tokens=40, seed=1, **LP))
    assert len(out.logprobs) == len(out.token_ids) == 40 and len(out.text_offsets) == 40
    for token, entry, p in zip(out.token_ids, out.logprobs, max_prob):
        assert next(iter(entry)) == token and entry[token].rank == 1          # the committed argmax
        assert math.exp(entry[token].logprob) == pytest.approx(p, rel=1e-4)
        assert 3 <= len(entry) <= 4 and sorted(e.rank for e in entry.values())[:3] == [1, 2, 3]
        assert all(e.logprob <= 0 for e in entry.values())
    assert out.text_offsets == sorted(out.text_offsets) and out.text_offsets[-1] <= len(out.text)
    none = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=40, seed=1, max_denoising_steps=4, ignore_eos=True))[0]
    assert none.token_ids == out.token_ids and none.logprobs is None


@pytest.mark.parametrize("budget_mb", [256, 0.05])         # materialised, and the vocabulary streamed
def test_a_request_has_the_same_logprobs_alone_and_in_a_mixed_batch(model_dir, budget_mb):
    llm = LLM(model_dir, max_num_seqs=4, sampler_memory_mb=budget_mb)
    sp = SamplingParams(max_tokens=20, seed=4, **LP)
    alone = llm.generate([[9, 8, 7]], sp)[0]
    others = [SamplingParams(max_tokens=30, seed=5, top_k=5, max_denoising_steps=3),
              SamplingParams(max_tokens=10, seed=6, temperature=0.5, **{**LP, "logprobs": 7})]
    mixed = llm.generate([[1, 2, 3, 4, 5, 6], [9, 8, 7], [3, 3]], [others[0], sp, others[1]])
    assert mixed[1].token_ids == alone.token_ids and len(mixed[2].logprobs) == 10
    for a, b in zip(alone.logprobs, mixed[1].logprobs):
        assert list(a) == list(b)
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-5) and a[t].rank == b[t].rank


def test_streamed_entries_follow_their_text_and_stop_strings_cut_them(model_dir):
    """Byte tokens split UTF-8 characters and a stop string holds text back: every streamed output
    carries the entries of exactly the tokens its text covers, and the cut drops the stopped ones."""
    llm = LLM(model_dir, max_num_seqs=4)
    free = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=48, seed=3, **LP))[0]
    stop = free.text[30:33]
    assert len(stop) == 3 and stop not in free.text[:30]
    outs = list(llm.stream([[5, 6, 7]], SamplingParams(max_tokens=48, seed=3, stop=[stop], **LP)))
    final = outs[-1]
    assert final.finish_reason == "stop" and final.text == free.text[:30]
    assert len(final.logprobs) == len(final.token_ids) < 48
    assert final.logprobs == free.logprobs[:len(final.token_ids)]
    assert [e for o in outs for e in o.delta_logprobs] == final.logprobs
    decode = llm.tokenizer.decode
    for o in outs[:-1]:
        n = len(o.logprobs)
        assert len(decode(o.token_ids[:n]).rstrip("\ufffd")) <= len(o.text)          # all its text is sent
        assert n == len(o.token_ids) or len(decode(o.token_ids[:n + 1]).rstrip("\ufffd")) > len(o.text)


def test_a_262k_vocabulary_streams_under_the_budget():
    """The released vocabulary size: 2 rows x 16 positions x 262,144 fp32 logits would be 32 MB; the
    streamed pass stays within its 16 MB budget, and agrees with a direct log_softmax."""
    cfg = tiny_config(vocab_size=262144, hidden_size=32, num_hidden_layers=1, layer_types=["full_attention"])
    model = init_weights(DiffusionGemma(cfg), seed=0).eval()
    hidden, temp = torch.randn(2, 16, 32), torch.full((2,), 0.6)
    ids = torch.randint(0, 262144, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), PeakMemory("cpu") as mem:
        got = committed_logprobs(model, hidden, temp, ids, 20, 16 << 20)
    assert mem.mb < 16
    _, chosen, rank, order = direct(model, hidden[:1, :4], temp[:1], ids[:1, :4], 20)
    torch.testing.assert_close(got.logprob[:4], chosen, atol=1e-4, rtol=0)
    assert torch.equal(got.rank[:4], rank) and torch.equal(got.top_ids[:4], order)


def test_vocabulary_slices_merge_into_the_whole():
    """Tensor parallelism's path: two ranks' slice statistics (ids offset by the first slice), merged,
    with the tokens above arbitrary commits counted per slice and summed, equal one whole pass."""
    from blockdiff.diffusion.logprobs import count_above, finish, merge, slice_stats
    from blockdiff.diffusion.vocab_stream import Head

    model = tiny_model(1000)
    w, h, temp = model.embed_tokens.weight, torch.randn(2, 8, model.config.hidden_size), torch.tensor([0.5, 0.9])
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(2))
    flat_h, flat_t, cap = h.reshape(16, -1), temp.repeat_interleave(8), model.config.final_logit_softcapping
    heads = [(Head(w[:600], cap, None), 0), (Head(w[600:], cap, None), 600)]
    with torch.no_grad():
        parts = [slice_stats(head, flat_h, flat_t, ids.reshape(-1), 5, 128, lo) for head, lo in heads]
        pairs = {id(getattr(parts[0], f)): getattr(parts[1], f) for f in ("m", "z", "chosen", "top_key")}
        merged = merge(parts[0], lambda t: torch.stack((t, pairs[id(t)])))
        above = sum(count_above(head, flat_h, flat_t, merged.chosen, 128) for head, _ in heads)
        got = finish(merged, 5, above)
    _, chosen, rank, order = direct(model, h, temp, ids, 5)
    torch.testing.assert_close(got.logprob, chosen, atol=1e-5, rtol=0)
    assert torch.equal(got.rank, rank) and torch.equal(got.top_ids, order) and (rank > 5).any()
