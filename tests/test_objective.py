"""The training objective: corruption, the one-pass block-diffusion mask, and parity of the
one-pass training forward with the inference path (encode + denoise)."""
import math

import pytest
import torch

from blockdiff import DiffusionGemma, ModelConfig
from blockdiff.config import FULL, SLIDING
from blockdiff.train.objective import (Objective, TrainingModel, block_diffusion_allowed, causal_allowed, corrupt,
                                       diffusion_loss, forward_hidden, sample_rates, training_masks)
from blockdiff.model.init import init_weights

# Sliding windows below, equal to and above the canvas, and both layer-type orders.
CONFIGS = {
    "window_12_canvas_8": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                               layer_types=[SLIDING, FULL, SLIDING], num_attention_heads=4, num_key_value_heads=2,
                               head_dim=8, global_head_dim=16, num_global_key_value_heads=1, sliding_window=12,
                               num_experts=4, top_k_experts=2, moe_intermediate_size=16, canvas_length=8),
    "window_4_canvas_4": dict(vocab_size=96, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                              layer_types=[FULL, SLIDING], num_attention_heads=2, num_key_value_heads=1,
                              head_dim=12, global_head_dim=24, sliding_window=4, num_experts=2, top_k_experts=1,
                              moe_intermediate_size=8, canvas_length=4),
}


def tiny_model(name: str, seed: int = 0) -> DiffusionGemma:
    torch.manual_seed(seed)
    model = DiffusionGemma(ModelConfig(**CONFIGS[name]))
    init_weights(model, std=0.1)
    with torch.no_grad():   # perturb what init leaves at 1.0, and make encoder/decoder scalars differ
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
        for i, layer in enumerate(model.layers):
            layer.layer_scalar.fill_(0.9 + 0.05 * i)
            layer.encoder_layer_scalar.fill_(1.1 - 0.05 * i)
    return model.eval()


def naive_mask(length: int, canvas: int, window: int | None) -> torch.Tensor:
    """The rules written out position by position, without the predicate's vectorised parts."""
    size = 2 * length
    out = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        for j in range(size):
            if i < length:                       # clean query: causal (and windowed) over clean keys
                ok = j < length and j <= i and (window is None or i - j < window)
            else:                                # noisy query in block b
                b = (i - length) // canvas
                if j >= length:
                    ok = (j - length) // canvas == b
                else:
                    lo = 0 if window is None else max(0, b * canvas - (window - 1))
                    ok = lo <= j < b * canvas
            out[i, j] = ok
    return out


@pytest.mark.parametrize("length,canvas,window", [(16, 4, None), (16, 4, 3), (24, 8, 12), (24, 8, 8), (12, 6, 40)])
def test_block_diffusion_mask_matches_naive_loop(length, canvas, window):
    idx = torch.arange(2 * length)
    got = block_diffusion_allowed(idx[:, None], idx[None, :], length, canvas, window)
    assert torch.equal(got, naive_mask(length, canvas, window))


@pytest.mark.parametrize("window", [None, 5])
def test_causal_mask_matches_naive_loop(window):
    n = 14
    idx = torch.arange(n)
    ref = torch.tensor([[j <= i and (window is None or i - j < window) for j in range(n)] for i in range(n)])
    assert torch.equal(causal_allowed(idx[:, None], idx[None, :], window), ref)


def test_training_masks_are_additive_per_layer_type():
    config = ModelConfig(**CONFIGS["window_12_canvas_8"])
    masks = training_masks(config, 16, True, torch.float32, "cpu")
    assert set(masks) == {SLIDING, FULL}
    for kind, window in ((FULL, None), (SLIDING, 12)):
        assert masks[kind].shape == (1, 1, 32, 32)
        allowed = masks[kind][0, 0] == 0
        assert torch.equal(allowed, naive_mask(16, 8, window))
        assert (masks[kind][0, 0][~allowed] == torch.finfo(torch.float32).min).all()


def test_sample_rates_range_and_determinism():
    t = sample_rates(64, 8, 1e-3, torch.Generator().manual_seed(0))
    assert t.shape == (64, 8) and t.min() >= 1e-3 and t.max() < 1.0
    assert torch.equal(t, sample_rates(64, 8, 1e-3, torch.Generator().manual_seed(0)))


def test_corrupt_rate_zero_and_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (4, 32), generator=gen)
    assert torch.equal(corrupt(x, torch.zeros(4, 4), 50, gen), x)
    noisy = corrupt(x, torch.ones(4, 4), 50, gen)       # fully uniform: agrees with x ~1/V of the time
    assert noisy.min() >= 0 and noisy.max() < 50
    assert (noisy == x).float().mean() < 0.15


def test_corrupt_per_canvas_rate():
    """Canvas b of every row changes with probability t_b * (1 - 1/V), its rate and no other."""
    vocab, canvas = 1000, 2000
    x = torch.randint(0, vocab, (2, 3 * canvas), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([[0.1, 0.5, 0.9], [0.9, 0.0, 0.3]])
    noisy = corrupt(x, t, vocab, torch.Generator().manual_seed(2))
    changed = (noisy != x).float().view(2, 3, canvas).mean(-1)
    expected = t * (1 - 1 / vocab)
    assert (changed - expected).abs().max() < 0.03, changed


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_pass_forward_equals_encode_then_denoise(name):
    """The training forward's canvas logits are the decoder's at inference, block by block (with
    self-conditioning on one row), and its clean logits are the encoder's."""
    model = tiny_model(name)
    config = model.config
    c, n, batch = config.canvas_length, 5, 2
    length = n * c
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, config.vocab_size, (batch, length), generator=gen)
    x_noisy = corrupt(x, sample_rates(batch, n, 1e-3, gen), config.vocab_size, gen)
    sc_logits = 3 * torch.randn(batch, length, config.vocab_size, generator=gen)
    soft = model.soft_embedding(sc_logits) * torch.tensor([1.0, 0.0])[:, None, None]
    with torch.no_grad():
        clean_h, noisy_h = forward_hidden(model, x, x_noisy, soft, training_masks(config, length, True,
                                                                                   torch.float32, "cpu"))
        got = model.logits(noisy_h)
        for b in range(n):
            block = slice(b * c, (b + 1) * c)
            cache = model.new_cache(batch, length)
            if b:
                model.encode(x[:, :b * c], cache)
            ref = model.logits(model.denoise(x_noisy[:, block], cache, soft[:, block]))
            assert (got[:, block] - ref).abs().max().item() < 1e-5, f"canvas {b}"
        enc = model.encode(x, model.new_cache(batch, length), need_hidden=True)
        assert (model.logits(clean_h) - model.logits(enc)).abs().max().item() < 1e-5


def test_losses_at_init_are_near_log_vocab():
    model = tiny_model("window_12_canvas_8")
    init_weights(model, std=0.02)
    x = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = diffusion_loss(model, x, Objective(), torch.Generator().manual_seed(1))
    assert abs(losses.decoder.item() - math.log(128)) < 0.3
    assert abs(losses.encoder.item() - math.log(128)) < 0.3
    assert torch.allclose(losses.loss.detach(), losses.decoder + losses.encoder)


@pytest.mark.parametrize("p,trained", [(0.0, False), (1.0, True)])
def test_self_conditioning_receives_gradient_only_when_used(p, trained):
    model = tiny_model("window_4_canvas_4").train()
    x = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(0))
    TrainingModel(model, Objective(self_cond_p=p))(x, torch.Generator().manual_seed(1)).loss.backward()
    grad = model.self_conditioning.gate_proj.weight.grad
    assert grad is not None and (grad.abs().sum() > 0) == trained


def test_ar_objective_is_the_encoder_loss():
    model = tiny_model("window_12_canvas_8")
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = TrainingModel(model, Objective(kind="ar"))(x)
        h = model.encode(x, model.new_cache(2, 24), need_hidden=True)
        ref = torch.nn.functional.cross_entropy(model.logits(h[:, :-1]).reshape(-1, 128), x[:, 1:].reshape(-1))
    assert losses.decoder is None
    assert abs(losses.loss.item() - ref.item()) < 1e-5


def test_objective_validation():
    with pytest.raises(ValueError, match="kind"):
        Objective(kind="mdlm")
    with pytest.raises(ValueError, match="self_cond_p"):
        Objective(self_cond_p=1.5)


def test_compiled_vocab_ops_equal_eager_losses_and_gradients():
    """The torch.compile'd head/softcap/CE and soft embedding give the eager losses and gradients."""
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    grads, losses = [], []
    for compiled in (False, True):
        model = tiny_model("window_12_canvas_8").train()
        losses.append(TrainingModel(model, Objective(self_cond_p=1.0), compiled)(x, torch.Generator().manual_seed(4)))
        losses[-1].loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    eager, fused = losses
    for part in ("loss", "decoder", "encoder"):
        torch.testing.assert_close(getattr(fused, part), getattr(eager, part), rtol=1e-5, atol=1e-5)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
