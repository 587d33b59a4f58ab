"""Tensor parallelism on CPU: two gloo worker processes give one process's tokens; bad sizes and a
dead worker are clear errors. One two-rank engine serves the module (a worker start imports torch,
seconds on a loaded machine); the test that kills one of its workers runs last."""
import copy
import os
import signal
import time

import numpy as np
import pytest
import torch
from test_engine import mixed_params as engine_mixed_params

from blockdiff.checkpoint import load_model, settled_config
from blockdiff.config import ModelConfig
from blockdiff.distributed.executor import WorkerError, rank_devices
from blockdiff.distributed.layout import Layout
from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.model.layers import Experts
from blockdiff.model.transformer import DiffusionGemma
from blockdiff.quant.convert import quantize
from blockdiff.random_model import create_random_model, tiny_config, tiny_vision_config

CORES = len(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(CORES < 2, reason="two CPU ranks need two cores")

# GQA with 2 KV heads on sliding layers (one per rank) and 1 on full layers (held by both ranks),
# sliding and full layers, 4 experts with top-3 routing (two experts per rank), a vocabulary of 265
# that two ranks split unevenly (133 + 132 rows), and a vision tower (held whole by every rank).
CONFIG = tiny_vision_config(vocab_size=265, top_k_experts=3)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("tp") / "m", CONFIG, seed=3)


@pytest.fixture(scope="module")
def tp2(path):
    llm = LLM(path, max_num_seqs=8, tensor_parallel_size=2)
    pids = llm.runner.pids
    yield llm
    llm.close()
    assert not any(alive(pid) for pid in pids)                 # close() stops and reaps every worker


def mixed_params():
    """The engine tests' mixed batch (sampled, greedy, fixed-step, wide-temperature, top-k + top-p) and
    a top-p row."""
    return engine_mixed_params() + [SamplingParams(max_tokens=16, seed=6, max_denoising_steps=4, top_p=0.8,
                                                   temperature=1.5, ignore_eos=True)]


def picture(seed: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8))


def run_with_frames(llm: LLM, prompts, params):
    """Tokens per request and every denoising step's frame (argmax tokens, max probabilities)."""
    for i, (p, sp) in enumerate(zip(prompts, params)):
        llm.add_request(p, sp, request_id=f"r{i}", frames=True)
    tokens, frames = {}, {}
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                tokens[out.request_id] = out.token_ids
        for f in llm.frames:
            frames[(f.request_id, f.canvas, f.step)] = (f.tokens, f.max_prob)
    return tokens, frames


def test_two_ranks_give_one_process_tokens(path, tp2):
    """fp32, a mixed batch with two image prompts: every token and every step's argmax equal;
    probabilities differ only by the summation order of the split reductions (measured: ~2e-8)."""
    prompts = [list(range(5, 5 + n)) for n in (7, 30, 3, 70)]           # 70 > the sliding window
    prompts += [{"prompt": "Describe <|image|> now", "multi_modal_data": {"image": picture(s)}} for s in (5, 6)]
    one_tokens, one_frames = run_with_frames(LLM(path, max_num_seqs=8), prompts, mixed_params())
    two_tokens, two_frames = run_with_frames(tp2, prompts, mixed_params())
    assert two_tokens == one_tokens and len(one_tokens) == len(prompts)
    with pytest.raises(ValueError, match="single-device"):       # structured output: one device only
        tp2.add_request([5, 6], SamplingParams(json_object=True))
    assert two_frames.keys() == one_frames.keys()
    for key, (toks, probs) in one_frames.items():
        assert two_frames[key][0] == toks, key
        assert max(abs(a - b) for a, b in zip(two_frames[key][1], probs)) < 1e-6, key


def test_prefix_reuse_on_every_rank(path, tp2):
    prompt = list(range(5, 60))
    sp = SamplingParams(max_tokens=20, seed=3, max_denoising_steps=3, ignore_eos=True)
    expected = LLM(path, tokenizer=None, max_num_seqs=4).generate([prompt], sp)[0].token_ids
    first = tp2.generate([prompt], sp)[0]
    alloc = tp2.scheduler.kv.allocate(prompt)                  # a finished slot still holds the prompt
    assert alloc.reuse == len(prompt)
    tp2.scheduler.kv.free(alloc.slot)
    again = tp2.generate([prompt], sp)[0]                      # reuses it on both ranks
    siblings = tp2.generate([prompt] * 3, [sp] * 3)            # copies the prefix between slots
    assert first.token_ids == expected and again.token_ids == expected
    assert all(s.token_ids == expected for s in siblings)


def test_two_ranks_give_one_process_logprobs(path, tp2):
    """Each rank streams its vocabulary slice; the merged entries equal one process's (ids, ranks
    exactly; values to the split sums' rounding)."""
    sp = SamplingParams(max_tokens=20, seed=3, max_denoising_steps=3, ignore_eos=True, logprobs=4)
    one = LLM(path, max_num_seqs=4).generate([[5, 6, 7]], sp)[0]
    two = tp2.generate([[5, 6, 7]], sp)[0]
    assert two.token_ids == one.token_ids and len(two.logprobs) == 20
    for a, b in zip(one.logprobs, two.logprobs):
        assert list(a) == list(b) and [x.rank for x in a.values()] == [x.rank for x in b.values()]
        assert max(abs(a[t].logprob - b[t].logprob) for t in a) < 1e-5


def test_one_all_reduce_per_block(tp2):
    """A denoising step's collectives: two per layer (attention; the dense MLP's and the experts'
    partial sums together), one for the embedding, one for self-conditioning, four for the sampler."""
    def collectives(steps: int) -> int:
        sp = SamplingParams(max_tokens=CONFIG.canvas_length, seed=1, max_denoising_steps=steps, fixed_steps=True,
                            ignore_eos=True)
        tp2.runner.set_timing(True)
        tp2.generate([list(range(5, 12))], sp)
        count = tp2.runner.stats()[0]["collectives"]
        tp2.runner.set_timing(False)
        return count

    assert collectives(3) - collectives(2) == 2 * CONFIG.num_hidden_layers + 6


def test_the_driver_holds_no_weights(tp2):
    assert tp2.model.embed_tokens.weight.device.type == "meta"
    assert tp2.limits[0] == CONFIG.vocab_size
    facts = tp2.runner.facts
    assert [f["device"] for f in facts] == ["cpu", "cpu"]
    one = sum(t.numel() for t in DiffusionGemma(CONFIG).state_dict().values()) * 4
    assert all(f["weight_bytes"] < 0.75 * one for f in facts)          # each rank holds about half


def test_shards_cover_every_tensor_once():
    """The ranks' slices of each sharded tensor tile it without overlap (KV heads held by several
    ranks excepted); replicated tensors are whole on every rank."""
    full = {n: tuple(t.shape) for n, t in DiffusionGemma(CONFIG).state_dict().items()}
    for world in (2, 4):
        layout = Layout.check(CONFIG, world)
        skeletons = [layout.shard(r).skeleton().state_dict() for r in range(world)]
        for name, shape in full.items():
            parts = [layout.shard(r).index(name, shape) for r in range(world)]
            assert all(tuple(s[name].shape) == layout.shard(r).shape(name, shape) for r, s in enumerate(skeletons))
            if not parts[0]:
                continue
            dim = len(parts[0]) - 1
            covered = sorted({(p[dim].start, p[dim].stop) for p in parts})
            assert covered[0][0] == 0 and covered[-1][1] == shape[dim], name
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), name


@pytest.mark.parametrize("grouped", [False, True])
def test_experts_held_by_four_ranks_add_up_to_all_experts(grouped):
    """Expert parallelism inside one process: four `Experts` holding two of eight experts each;
    their outputs summed (what the all-reduce does) equal all eight experts', bit for bit (each
    token's two terms add to the same value in either grouping)."""
    cfg = ModelConfig(hidden_size=64, num_experts=8, top_k_experts=2, moe_intermediate_size=48)
    gen = torch.Generator().manual_seed(0)
    full = Experts(cfg)
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    parts = []
    for rank in range(4):
        part = copy.deepcopy(full)
        part.gate_up_proj = torch.nn.Parameter(full.gate_up_proj[2 * rank:2 * rank + 2].clone())
        part.down_proj = torch.nn.Parameter(full.down_proj[2 * rank:2 * rank + 2].clone())
        part.hold(2 * rank, 2, 8)
        parts.append(part)
    if grouped:
        assert all(m.use_grouped_mm() for m in (full, *parts))
    x = torch.randn(37, 64, generator=gen)
    idx = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(37)])
    w = torch.rand(37, 2, generator=gen)
    with torch.no_grad():
        assert torch.equal(sum(p(x, w, idx) for p in parts), full(x, w, idx))


@pytest.fixture(scope="module")
def int4_packs(tmp_path_factory):
    """w4a16 (int4 linears and experts) of a config whose int4 groups split over two ranks (o_proj
    and down_proj: 256 inputs, two groups of 128), and of the default tiny config (one group of 64)."""
    root = tmp_path_factory.mktemp("tp_int4")
    wide = create_random_model(root / "wide", tiny_config(head_dim=64, global_head_dim=64, intermediate_size=256),
                               seed=1)
    narrow = create_random_model(root / "narrow", tiny_config(), seed=1)
    return quantize(wide, root / "wide-w4a16", "w4a16", progress=False), \
        quantize(narrow, root / "narrow-w4a16", "w4a16", progress=False)


def test_int4_checkpoint_splits_along_packed_words_and_groups(int4_packs):
    """Two ranks' parts of an int4 checkpoint, loaded in one process: column-parallel outputs side by
    side, and expert outputs summed, equal the whole model's (the same packed values and scales,
    sliced along the axis they were packed on); row-parallel outputs summed agree within bf16
    rounding (the int4 kernel takes and returns bf16, so each rank's partial sum is rounded)."""
    path = int4_packs[0]
    whole = load_model(path, dtype="float32")
    layout = Layout.check(settled_config(path), 2)
    parts = [load_model(path, dtype="float32", shard=layout.shard(r)) for r in range(2)]
    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(9, 64, generator=gen), torch.randn(9, 256, generator=gen)
    idx = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(9)])
    w = torch.rand(9, 2, generator=gen)
    layer, ranks = whole.layers[1], [p.layers[1] for p in parts]
    with torch.no_grad():
        q = torch.cat([r.self_attn.q_proj(x) for r in ranks], dim=-1)
        torch.testing.assert_close(q, layer.self_attn.q_proj(x), rtol=1e-5, atol=1e-6)
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            split = sum(r.get_submodule(name)(h[:, 128 * i:128 * (i + 1)]) for i, r in enumerate(ranks))
            one = layer.get_submodule(name)(h)
            assert (split - one).norm() / one.norm() < 2 ** -7, name
        assert torch.equal(sum(r.experts(x, w, idx) for r in ranks), layer.experts(x, w, idx))


def test_int4_groups_that_straddle_ranks_are_named(int4_packs):
    path = int4_packs[1]
    with pytest.raises(ValueError, match="o_proj': int4 groups of 64 inputs do not split over 2 ranks"):
        load_model(path, shard=Layout.check(settled_config(path), 2).shard(0))


@pytest.mark.parametrize("world, overrides, field", [
    (3, {}, "num_attention_heads"),
    (2, {"num_attention_heads": 6, "num_key_value_heads": 3}, "num_key_value_heads"),
    (2, {"num_global_key_value_heads": 3, "num_attention_heads": 6, "num_key_value_heads": 6},
     "num_global_key_value_heads"),
    (2, {"intermediate_size": 129}, "intermediate_size"),
    (2, {"num_experts": 3, "top_k_experts": 2}, "num_experts"),
    (0, {}, "positive integer"),
    ("2", {}, "positive integer"),
])
def test_sizes_that_do_not_divide_are_named(world, overrides, field):
    with pytest.raises(ValueError, match=field):
        Layout.check(tiny_config(**overrides), world)


def test_more_ranks_than_devices_and_bad_sizes_start_nothing(path):
    with pytest.raises(ValueError, match=f"exceeds the {CORES} CPU cores"):
        rank_devices("cpu", CORES + 1)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="needs 2 GPUs from cuda:0"):
            rank_devices("cuda", 2)
    with pytest.raises(ValueError, match="divide num_attention_heads"):
        LLM(path, tokenizer=None, tensor_parallel_size=3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_give_one_gpu_tokens(path):
    """NCCL: the same check as on CPU, fp32, on cuda:0 and cuda:1 against cuda:0 alone."""
    prompts = [list(range(5, 5 + n)) for n in (7, 30, 3, 70, 12, 9)]
    kw = dict(tokenizer=None, max_num_seqs=8, dtype="float32", device="cuda", compile=False)
    one, _ = run_with_frames(LLM(path, **kw), prompts, mixed_params())
    with LLM(path, tensor_parallel_size=2, **kw) as llm:
        two, _ = run_with_frames(llm, prompts, mixed_params())
    assert two == one


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_worker_fails_fast_and_leaves_no_process(tp2):
    """Last: it kills the module's engine."""
    sp = SamplingParams(max_tokens=16, seed=0, max_denoising_steps=2, ignore_eos=True)
    tp2.generate([[5, 6, 7]], sp)
    pids = tp2.runner.pids
    os.kill(pids[1], signal.SIGKILL)
    start = time.perf_counter()
    with pytest.raises(WorkerError, match=rf"worker 1 of 2 \(cpu, pid {pids[1]}\) was killed by SIGKILL"):
        tp2.generate([[5, 6, 7]], sp)
    assert time.perf_counter() - start < 30
    assert not any(alive(pid) for pid in pids)                # rank 0 was stopped and reaped too
    assert not tp2.healthy                                     # what a server's /health reports
    with pytest.raises(WorkerError, match="create a new LLM"):   # and the engine stays stopped
        tp2.generate([[5, 6, 7]], sp)
