"""Counter-based draws: the two-level inverse-CDF sampler against the plain definition."""
import pytest
import torch

from blockdiff.diffusion.noise import hash_uniform, inverse_cdf_sample


def flat_inverse_cdf(probs, u):
    """The definition: the first index whose cumulative probability exceeds u * total."""
    cdf = torch.cumsum(probs.double(), dim=-1)
    return torch.searchsorted(cdf, (u.double() * cdf[..., -1])[..., None], right=True).squeeze(-1)


@pytest.mark.parametrize("vocab", [8192, 96, 301])      # two-level (256 and 32 per block) and flat
def test_inverse_cdf_matches_definition(vocab):
    gen = torch.Generator().manual_seed(vocab)
    probs = torch.softmax(3 * torch.randn(4, 32, vocab, generator=gen), -1)
    u = hash_uniform(torch.arange(4), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 32)
    ids = inverse_cdf_sample(probs, u)
    ref = flat_inverse_cdf(probs, u)
    # fp32 vs fp64 sums may only disagree for a draw within rounding of a boundary: neighbours
    assert (ids == ref).float().mean() > 0.99 and (ids - ref).abs().max() <= 1
    counts = torch.bincount(inverse_cdf_sample(probs[:1, :1].expand(1, 4096, vocab).contiguous(),
                                               torch.rand(1, 4096, generator=gen)).flatten(), minlength=vocab)
    top = probs[0, 0].argmax()
    assert abs(counts[top].item() / 4096 - probs[0, 0, top].item()) < 0.05     # frequencies follow probs


def test_inverse_cdf_never_draws_a_zero_probability_token():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 8, 512, generator=gen), -1)
    probs[..., 1::2] = 0                                       # as top-k / top-p filtering leaves them
    for u in (torch.rand(2, 8, generator=gen), torch.full((2, 8), 1 - 2**-24), torch.zeros(2, 8)):
        assert (inverse_cdf_sample(probs, u) % 2 == 0).all()
