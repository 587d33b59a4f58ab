"""Engine: parity with the reference sampler, batch invariance, exactness, prefix reuse, bad input."""
import pytest
import torch
from hf_oracle import CONFIGS

import blockdiff
from blockdiff.diffusion.noise import HashNoise
from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.random_model import create_random_model


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("engine") / "m", seed=2)


def reference_ids(model, prompt, sp: SamplingParams):
    sp = sp.with_defaults(SamplingParams.built_in())          # what the engine runs: the model has no generation config
    c = model.config.canvas_length
    n = -(-sp.max_tokens // c) * c
    out = blockdiff.reference_generate(
        model, torch.tensor([prompt]), max_new_tokens=n, max_denoising_steps=sp.max_denoising_steps,
        t_min=sp.t_min, t_max=sp.t_max, entropy_bound=sp.entropy_bound, stability_threshold=sp.stability_threshold,
        confidence_threshold=sp.confidence_threshold, temperature=sp.temperature, fixed_steps=sp.fixed_steps,
        noise=HashNoise([sp.seed]), return_output=True)
    return out.sequences[0, len(prompt):len(prompt) + sp.max_tokens].tolist(), out.steps_per_canvas


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_equals_reference(hf_dirs, name, temperature):
    """Single request: the engine's tokens equal the reference fed the same draws (HashNoise)."""
    _, path = hf_dirs[name]
    llm = LLM(blockdiff.load_model(path), tokenizer=None)
    out, sp = check_against_reference(llm, list(range(3, 3 + CONFIGS[name]["sliding_window"] + 5)), temperature)
    assert out.finish_reason == "length" and len(out.token_ids) == sp.max_tokens


def check_against_reference(llm: LLM, prompt: list[int], temperature: float):
    """Three canvases of one request: the engine's tokens and steps per canvas equal the reference's."""
    sp = SamplingParams(max_tokens=3 * llm.model.config.canvas_length - 1, seed=17, max_denoising_steps=4,
                        temperature=temperature, ignore_eos=True, confidence_threshold=100.0, stability_threshold=1)
    out = llm.generate([prompt], sp)[0]
    ids, steps = reference_ids(llm.model, prompt, sp)
    assert out.token_ids == ids
    assert out.stats.steps_per_canvas == steps
    return out, sp


def mixed_params():
    return [SamplingParams(max_tokens=40, seed=1, max_denoising_steps=5, ignore_eos=True),
            SamplingParams(max_tokens=20, seed=2, max_denoising_steps=3, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=70, seed=3, max_denoising_steps=6, fixed_steps=True, entropy_bound=0.5,
                           ignore_eos=True),
            SamplingParams(max_tokens=33, seed=4, max_denoising_steps=4, confidence_threshold=100.0,
                           stability_threshold=0, t_min=0.1, t_max=2.0, ignore_eos=True),
            SamplingParams(max_tokens=50, seed=5, max_denoising_steps=4, top_k=20, top_p=0.9, ignore_eos=True)]


def test_batch_invariance(demo_path):
    """Each request gives the same tokens alone and beside requests of other lengths and knobs."""
    llm = LLM(demo_path, max_num_seqs=8)
    prompts = [list(range(5, 5 + n)) for n in (7, 30, 3, 64, 12)]
    together = llm.generate(prompts, mixed_params())
    for prompt, sp, out in zip(prompts, mixed_params(), together):
        alone = llm.generate([prompt], sp)[0]
        assert alone.token_ids == out.token_ids
        assert len(out.token_ids) == sp.max_tokens
    assert together[3].stats.steps_per_canvas == [1] * 3        # stability 0 + lax confidence: 1 step


def test_more_requests_than_slots(demo_path):
    llm = LLM(demo_path, max_num_seqs=2)
    sps = [SamplingParams(max_tokens=10 + i, seed=i, max_denoising_steps=2, ignore_eos=True) for i in range(5)]
    outs = llm.generate([[5, 6, 7 + i] for i in range(5)], sps)
    assert [len(o.token_ids) for o in outs] == [10, 11, 12, 13, 14]
    assert not llm.has_unfinished() and llm.scheduler.kv.num_free == 2


def test_eos_and_stop_strings(demo_path):
    llm = LLM(demo_path)
    sp = SamplingParams(max_tokens=48, seed=8, max_denoising_steps=3, ignore_eos=True)
    full = llm.generate(["Hello"], sp)[0]
    llm.output.eos_ids = {full.token_ids[20]}                 # pretend this token is EOS
    cut = llm.generate(["Hello"], SamplingParams(max_tokens=48, seed=8, max_denoising_steps=3))[0]
    first = full.token_ids.index(full.token_ids[20])
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[:first]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    out = llm.generate(["Hello"], SamplingParams(max_tokens=48, seed=8, max_denoising_steps=3, ignore_eos=True,
                                                 stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.find(stop)]


def test_streaming_deltas_add_up(demo_path):
    llm = LLM(demo_path)
    sp = SamplingParams(max_tokens=40, seed=4, max_denoising_steps=2, ignore_eos=True)
    chunks = list(llm.stream("Hi", sp))
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    assert len(chunks) == 3                                # 40 tokens = 3 canvases of 16
    assert "".join(c.delta_text for c in chunks) == chunks[-1].text
    assert sum((c.delta_token_ids for c in chunks), []) == chunks[-1].token_ids
    assert chunks[-1].stats.time_to_first_token > 0 and chunks[-1].stats.tokens_per_second > 0


def test_prefix_reuse_gives_same_output(demo_path):
    llm = LLM(demo_path, max_num_seqs=4)
    prompt = list(range(5, 60))
    sp = SamplingParams(max_tokens=20, seed=3, max_denoising_steps=3, ignore_eos=True)
    first = llm.generate([prompt], sp)[0]
    alloc = llm.scheduler.kv.allocate(prompt)              # a finished slot still holds the prompt
    assert alloc.reuse == len(prompt)
    llm.scheduler.kv.free(alloc.slot)
    again = llm.generate([prompt], sp)[0]
    siblings = llm.generate([prompt] * 3, [sp] * 3)         # n=3: copies the prefix between slots
    assert again.token_ids == first.token_ids and all(s.token_ids == first.token_ids for s in siblings)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"max_denoising_steps": 0}, "max_denoising_steps"), ({"t_min": 0.9, "t_max": 0.5}, "t_max"),
    ({"entropy_bound": 0}, "entropy_bound"), ({"seed": "x"}, "seed"), ({"temperature": -1}, "temperature"),
    ({"stop": [3]}, "stop"), ({"confidence_threshold": -1.0}, "confidence_threshold"),
])
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests(demo_path):
    llm = LLM(demo_path, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.add_request([5] * 40, SamplingParams(max_tokens=32))
    with pytest.raises(ValueError, match="token ids"):
        llm.add_request([10**6])
    with pytest.raises(ValueError, match="token ids"):
        llm.add_request([])


def naive_ar(model, prompt, n):
    """Greedy AR by re-encoding the whole sequence each step (no cache reuse): obviously correct."""
    ids = list(prompt)
    for _ in range(n):
        cache = model.new_cache(1, len(ids))
        h = model.encode(torch.tensor([ids]), cache, need_hidden=True)
        ids.append(int(model.logits(h[:, -1]).argmax(-1)))
    return ids[len(prompt):]


def test_ar_greedy_matches_naive_and_is_batch_invariant(demo_path):
    from blockdiff.engine.ar import ar_generate

    model = blockdiff.load_model(demo_path)
    prompts = [list(range(5, 5 + n)) for n in (70, 9)]            # 70 > the 64-token sliding window
    batched = ar_generate(model, prompts, max_tokens=12)
    assert batched.token_ids[0] == naive_ar(model, prompts[0], 12)
    assert batched.token_ids[1] == naive_ar(model, prompts[1], 12)
    sampled = ar_generate(model, prompts, max_tokens=12, temperature=1.0, seed=3).token_ids
    assert sampled[1] == ar_generate(model, prompts[1:], max_tokens=12, temperature=1.0, seed=4).token_ids[0]
    assert sampled != batched.token_ids


def test_canvas_frames_only_when_asked(demo_path):
    llm = LLM(demo_path)
    sp = SamplingParams(max_tokens=20, seed=1, max_denoising_steps=3, fixed_steps=True, ignore_eos=True)
    a = llm.add_request([5, 6, 7], sp, frames=True)
    llm.add_request([5, 6, 8], sp)
    frames = []
    while llm.has_unfinished():
        llm.step()
        frames += llm.frames
    assert {f.request_id for f in frames} == {a}
    assert [(f.canvas, f.step) for f in frames] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert all(len(f.tokens) == 16 and len(f.max_prob) == 16 and 0 < max(f.max_prob) <= 1 for f in frames)


def test_compiled_sampler_core_matches_eager():
    """The opt-in torch.compile'd sampler computes the same quantities as the eager one."""
    from blockdiff.diffusion.sampler import compiled_sampler_core, sampler_core

    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 16, 300, generator=gen)).bfloat16()
    temp = torch.tensor([0.5, 0.8, 1.3])
    eager = sampler_core(logits, temp, 30.0)
    fused = compiled_sampler_core()(logits, temp, 30.0)
    for a, b in zip(eager, fused):
        if a.dtype.is_floating_point:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softcap_table_gives_the_computed_bits(dtype):
    """The eager sampler's softcap by table lookup gives the bits of tanh(x / cap) * cap computed in
    place on the logits tensor, for every finite 16-bit value (one row holding them all, so other
    shapes and vector positions than the table's own) and through the rest of the sampler core."""
    from blockdiff.diffusion.sampler import sampler_core, softcap_table

    table = softcap_table(30.0, dtype, "cpu")
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[every.isfinite()].flip(0)[None, None]               # (1, 1, ~64k)
    one = torch.ones(1)
    assert torch.equal(sampler_core(every, one, 30.0)[0], sampler_core(every, one, 30.0, table)[0])
    logits = (4 * torch.randn(3, 16, 300, generator=torch.Generator().manual_seed(0))).to(dtype)
    temp = torch.tensor([0.5, 0.8, 1.3])
    for a, b in zip(sampler_core(logits, temp, 30.0), sampler_core(logits, temp, 30.0, table)):
        assert torch.equal(a, b)


def test_compiled_engine_matches_eager(demo_path):
    """LLM(compile=True) (compiled layers + sampler, dynamic shapes) gives the eager engine's tokens (fp32),
    alone and in a mixed batch."""
    prompts = [list(range(5, 5 + n)) for n in (7, 30, 3)]
    params = mixed_params()[:3]
    eager = LLM(blockdiff.load_model(demo_path, dtype=torch.float32), tokenizer=None, max_num_seqs=4)
    compiled = LLM(blockdiff.load_model(demo_path, dtype=torch.float32), tokenizer=None, max_num_seqs=4, compile=True)
    compiled.warm_up()
    expected = [o.token_ids for o in eager.generate(prompts, params)]
    assert [o.token_ids for o in compiled.generate(prompts, params)] == expected
    assert compiled.generate([prompts[1]], params[1])[0].token_ids == expected[1]


def test_compiled_bf16_engine_follows_eager(demo_path):
    """bf16, where the grouped experts compile with the rest of the layer: the compiled decoder is as
    close to the fp32 model as the eager bf16 one (fused kernels keep fp32 between ops, so the two
    bf16 paths round differently: ~7% relative on this random model either way, which also flips
    about half of its near-uniform greedy tokens, so tokens are not compared). Wrong routing or
    offsets would be far off."""
    eager = LLM(blockdiff.load_model(demo_path, dtype=torch.bfloat16), tokenizer=None, max_num_seqs=4)
    compiled = LLM(blockdiff.load_model(demo_path, dtype=torch.bfloat16), tokenizer=None, max_num_seqs=4, compile=True)
    assert all(layer.experts.grouped for layer in compiled.model.layers)
    cfg = eager.model.config
    hidden = []
    for model in (blockdiff.load_model(demo_path, dtype=torch.float32), eager.model, compiled.model):
        cache = model.new_cache(2, 40)
        canvas = torch.arange(7, 7 + 2 * cfg.canvas_length).view(2, -1) % cfg.vocab_size
        with torch.no_grad():
            model.encode(torch.arange(3, 3 + 24).view(2, 12), cache)
            hidden.append(model.denoise(canvas, cache).float())
    err_eager, err_compiled = ((h - hidden[0]).norm() / hidden[0].norm() for h in hidden[1:])
    assert err_compiled < 1.5 * err_eager + 1e-3
    sp = SamplingParams(max_tokens=48, seed=3, max_denoising_steps=4, temperature=0, ignore_eos=True)
    prompts = [list(range(5, 5 + n)) for n in (7, 30)]
    assert [len(o.token_ids) for o in compiled.generate(prompts, sp)] == [48, 48]
