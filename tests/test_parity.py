"""Parity of blockdiff's model and reference sampler with transformers 5.23.0 (eager backends)."""
import pytest
import torch
from hf_oracle import CONFIGS, load_hf

import blockdiff
from blockdiff import reference_generate

NAMES = list(CONFIGS)


def inputs(name, batch=2, prompt_len=None, seed=1):
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(seed)
    prompt_len = prompt_len or cfg["sliding_window"] + 5      # longer than the sliding window
    prompt = torch.randint(3, cfg["vocab_size"] - 3, (batch, prompt_len), generator=gen)
    canvas = torch.randint(0, cfg["vocab_size"], (batch, cfg["canvas_length"]), generator=gen)
    return prompt, canvas


@pytest.mark.parametrize("name", NAMES)
def test_block_logits_fp32(hf_dirs, name):
    hf, path = hf_dirs[name]
    ours = blockdiff.load_model(path)
    prompt, canvas = inputs(name)
    with torch.no_grad():
        ref = hf(input_ids=prompt, decoder_input_ids=canvas).logits
    got = ours.block_logits(prompt, canvas)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_block_logits_bf16_bit_exact(hf_dirs, name):
    _, path = hf_dirs[name]
    hf = load_hf(path, dtype=torch.bfloat16)
    ours = blockdiff.load_model(path, dtype="bfloat16")
    assert ours.dtype == torch.bfloat16
    prompt, canvas = inputs(name)
    with torch.no_grad():
        ref = hf(input_ids=prompt, decoder_input_ids=canvas).logits
    got = ours.block_logits(prompt, canvas)
    assert torch.equal(got, ref), (got - ref).abs().max().item()


@pytest.mark.parametrize("name", NAMES)
def test_block_logits_left_padding_sdpa(hf_dirs, name):
    """A left-padded row gives the reference's logits (sdpa: transformers' eager path crashes on padding)."""
    _, path = hf_dirs[name]
    hf = load_hf(path, attn="sdpa", experts="grouped_mm")
    ours = blockdiff.load_model(path)
    ours.set_attention_impl("sdpa")
    prompt, canvas = inputs(name)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = hf(input_ids=prompt, attention_mask=mask, decoder_input_ids=canvas,
                 decoder_attention_mask=torch.cat([mask, torch.ones_like(canvas)], 1)).logits
    got = ours.block_logits(prompt, canvas, attention_mask=mask)
    assert (got - ref).abs().max().item() < 1e-4


class Boost:
    """Logits processor usable by both implementations: adds `amount` to chosen (row, position, token)."""

    def __init__(self, boosts, amount=60.0):
        self.boosts, self.amount = boosts, amount

    def apply(self, scores):
        scores = scores.clone()
        for row, pos, tok in self.boosts:
            scores[row, pos, tok] += self.amount
        return scores

    def __call__(self, input_ids, scores, cur_step=None):     # transformers' LogitsProcessor signature
        return self.apply(scores)


def run_both(name, hf_dirs, seed=7, boosts=(), prompt_len=None, **knobs):
    hf, path = hf_dirs[name]
    ours = blockdiff.load_model(path)
    prompt, _ = inputs(name, prompt_len=prompt_len)
    proc = Boost(boosts)
    from transformers import LogitsProcessorList
    torch.manual_seed(seed)
    ref = hf.generate(prompt, logits_processor=LogitsProcessorList([proc]) if boosts else None, **knobs)
    torch.manual_seed(seed)
    got = reference_generate(ours, prompt, logits_processor=(lambda x, s: proc.apply(x)) if boosts else None,
                             return_output=True, **knobs)
    return ref, got


@pytest.mark.parametrize("name", NAMES)
def test_generate_multi_canvas(hf_dirs, name):
    c = CONFIGS[name]["canvas_length"]
    ref, got = run_both(name, hf_dirs, max_new_tokens=3 * c - 1, max_denoising_steps=3)
    assert got.sequences.shape[1] == ref.sequences.shape[1]
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.equal(got.tokens_per_forward, ref.tokens_per_forward)


@pytest.mark.parametrize("name", NAMES)
def test_generate_eos_inside_canvas(hf_dirs, name):
    """Row 0 emits EOS mid-way through its 2nd canvas, row 1 never: pads after EOS, row 0 all pad later."""
    c = CONFIGS[name]["canvas_length"]
    ref, got = run_both(name, hf_dirs, boosts=[(0, c // 2, 1)], max_new_tokens=3 * c, max_denoising_steps=2,
                        eos_token_id=1, pad_token_id=0)
    assert (ref.sequences[0] == 0).any(), "oracle did not pad: the test would not exercise EOS"
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.equal(got.tokens_per_forward, ref.tokens_per_forward)


def test_generate_early_stop_per_row(hf_dirs):
    """Row 0 is made confident (stops early, then stays frozen); row 1 runs all steps."""
    name = "spec"
    c, v = CONFIGS[name]["canvas_length"], CONFIGS[name]["vocab_size"]
    boosts = [(0, p, (7 * p + 11) % v) for p in range(c)]
    ref, got = run_both(name, hf_dirs, boosts=boosts, max_new_tokens=2 * c, max_denoising_steps=6)
    assert ref.tokens_per_forward[0] > ref.tokens_per_forward[1], "row 0 did not stop early in the oracle"
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.equal(got.tokens_per_forward, ref.tokens_per_forward)
    assert got.steps_per_canvas == [6, 6]


def test_generate_all_rows_stop_early(hf_dirs):
    name = "full_first"
    c, v = CONFIGS[name]["canvas_length"], CONFIGS[name]["vocab_size"]
    boosts = [(r, p, (3 * p + r + 5) % v) for r in range(2) for p in range(c)]
    ref, got = run_both(name, hf_dirs, boosts=boosts, max_new_tokens=2 * c, max_denoising_steps=8,
                        t_min=0.5, t_max=1.5, entropy_bound=0.3, confidence_threshold=0.01, stability_threshold=2)
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.equal(got.tokens_per_forward, ref.tokens_per_forward)
    assert got.steps_per_canvas == [3, 3]         # stable for 2 steps needs 3 steps


def test_fixed_steps_never_stop_early(hf_dirs):
    name = "full_first"
    _, path = hf_dirs[name]
    ours = blockdiff.load_model(path)
    c, v = CONFIGS[name]["canvas_length"], CONFIGS[name]["vocab_size"]
    proc = Boost([(r, p, (3 * p + 5) % v) for r in range(2) for p in range(c)])
    prompt, _ = inputs(name)
    out = reference_generate(ours, prompt, max_new_tokens=c, max_denoising_steps=5, fixed_steps=True,
                             logits_processor=lambda x, s: proc.apply(x), return_output=True)
    assert out.steps_per_canvas == [5]
    early = reference_generate(ours, prompt, max_new_tokens=c, max_denoising_steps=5,
                               logits_processor=lambda x, s: proc.apply(x), return_output=True)
    assert early.steps_per_canvas == [2]
    assert torch.equal(out.sequences, early.sequences)    # the boosted argmax is the same either way


def test_generate_bf16_tokens(hf_dirs):
    """bf16 (eager backends) is bit-exact in logits, so whole generations match too."""
    name = "spec"
    _, path = hf_dirs[name]
    hf, ours = load_hf(path, dtype=torch.bfloat16), blockdiff.load_model(path, dtype=torch.bfloat16)
    prompt, _ = inputs(name)
    torch.manual_seed(3)
    ref = hf.generate(prompt, max_new_tokens=16, max_denoising_steps=3).sequences
    torch.manual_seed(3)
    assert torch.equal(reference_generate(ours, prompt, max_new_tokens=16, max_denoising_steps=3), ref)


def test_greedy_is_deterministic_and_seed_free(hf_dirs):
    _, path = hf_dirs["spec"]
    ours = blockdiff.load_model(path)
    prompt, _ = inputs("spec")
    gen = lambda s: reference_generate(ours, prompt, max_new_tokens=8, max_denoising_steps=3, temperature=0,
                                       generator=torch.Generator().manual_seed(s))
    assert torch.equal(gen(1), gen(1))
