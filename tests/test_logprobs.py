"""Log-probabilities of committed tokens: the math, the engine's per-token entries, batch independence.

The reference is a direct `log_softmax` of the final step's processed logits, softcap(h E^T) / T.
"""
import math

import pytest
import torch

from blockdiff.diffusion.logprobs import committed_logprobs
from blockdiff.diffusion.sampler import processed_logits
from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.model.init import init_weights
from blockdiff.model.transformer import DiffusionGemma
from blockdiff.random_model import tiny_config


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
