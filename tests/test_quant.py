"""Quantized checkpoints: low-bit linears and experts against their dequantized references, the
streaming converter, loading through every entry point, and the errors a user can meet."""
import json
import pytest
import torch
import torch.nn.functional as F

import blockdiff
from blockdiff.cli.common import DEFAULT_MODEL
from blockdiff.config import ModelConfig
from blockdiff.model.layers import Experts
from blockdiff.quant.convert import ct_tensors, quantize
from blockdiff.quant.modules import QuantExperts, QuantLinear
from blockdiff.quant.scheme import WeightArgs, dequantize_weight, pack_int4, quantize_weight, unpack_int4
from blockdiff.random_model import create_random_model, tiny_config

INT8 = WeightArgs(8, None, True)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quant_linear(w: torch.Tensor, args: WeightArgs) -> tuple[QuantLinear, torch.Tensor]:
    """A packed QuantLinear for weight w (N, K) and its dequantized weight."""
    n, k = w.shape
    mod = QuantLinear(k, n, args)
    tensors = ct_tensors("m", w, args)
    mod.load_state_dict({key[2:]: t for key, t in tensors.items()}, assign=True)
    q, scale = quantize_weight(w, args)
    mod.pack_for_kernels()
    return mod, dequantize_weight(q, scale)


def test_int4_packing_matches_the_compressed_tensors_layout():
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x76543210, 0xfedcba98 - 2**32]]      # low nibble first, q + 8
    q = torch.randint(-8, 8, (5, 21), dtype=torch.int8)                 # K not a multiple of 8: padded
    assert torch.equal(unpack_int4(pack_int4(q), 21) - 8, q.int())


def test_scales_are_absmax_over_half_range():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_weight(w, WeightArgs(8))
    # -absmax / scale = -127.5 (or -7.5) up to float rounding: either neighbour is right
    assert s[0, 0] == torch.tensor(2.0 / 127.5) and q[0, 1] in (-127, -128) and q[0, 0] == 64
    assert s[1, 0] == 1 and not q[1].any()
    q, s = quantize_weight(w, WeightArgs(4, 2))
    assert torch.allclose(s[0], torch.tensor([2.0 / 7.5, 0.5 / 7.5])) and q[0, 1] in (-7, -8)


@pytest.mark.parametrize("args,shape,tol", [
    (INT8, (96, 128), 0.03),                   # 7-bit activations without VNNI: ~1-2%
    (WeightArgs(4, 128), (64, 256), 0.01),     # bf16 activations around the int4 kernel
    (WeightArgs(4, 64), (48, 192), 0.01),
    (WeightArgs(4, 32), (40, 96), 0.01),       # N % 16 != 0: the dequantize path
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_bit_linear_matches_its_dequantized_reference(args, shape, tol, dtype):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    mod, deq = quant_linear(w, args)
    x = torch.randn(3, 7, shape[1]).to(dtype)
    out = mod(x)
    assert out.shape == (3, 7, shape[0]) and out.dtype == dtype
    assert rel(out, F.linear(x.float(), deq)) < tol + (0.01 if dtype == torch.bfloat16 else 0)
    assert not mod(torch.zeros(2, shape[1], dtype=dtype)).any()


@pytest.mark.parametrize("args", [INT8, WeightArgs(4, 64)])
def test_a_row_does_not_depend_on_the_rest_of_the_batch(args):
    """The engine's promise: a request's output never depends on its neighbours."""
    torch.manual_seed(1)
    mod, _ = quant_linear(torch.randn(32, 64), args)
    x = torch.randn(9, 64)
    x[3] *= 50
    alone = torch.cat([mod(x[i:i + 1]) for i in range(9)])
    assert torch.equal(mod(x), alone)


@pytest.mark.parametrize("rows", [1, 16, 40])        # <= 16 rows are padded for cuBLASLt
def test_int_mm_path_matches_its_dequantized_reference(monkeypatch, rows):
    """The CUDA w8a8 path (`torch._int_mm`, 8-bit activations per token), run on CPU by torch's own _int_mm."""
    from blockdiff.quant import kernels
    monkeypatch.setattr(kernels, "select_int8_kernel", lambda *a: "int-mm")
    torch.manual_seed(3)
    mod, deq = quant_linear(torch.randn(48, 64) * 0.05, INT8)
    assert mod.kernel_weight.kernel == "int-mm"
    x = torch.randn(rows, 64)
    x[0] *= 50
    out = mod(x)
    assert out.shape == (rows, 48) and rel(out, F.linear(x, deq)) < 0.01
    assert torch.equal(out, torch.cat([mod(x[i:i + 1]) for i in range(rows)]))     # rows independent


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_int_mm_grouped_chunks_of_any_size(monkeypatch, device):
    """The CUDA w8a8 experts (on CPU through torch's own _int_mm): one `_int_mm` per expert writing in
    place, chunks of <= 16 rows run on 17 (rows of later experts, overwritten by their own calls); each
    expert's rows equal that expert alone. An empty expert, and a short last chunk."""
    from blockdiff.quant import kernels
    monkeypatch.setattr(kernels, "select_int8_kernel", lambda *a: "int-mm")
    torch.manual_seed(5)
    pairs = [quantize_weight(torch.randn(24, 32, device=device) * 0.05, INT8) for _ in range(5)]
    counts = [1, 0, 16, 17, 3]
    x = torch.randn(sum(counts), 32, device=device)
    ends = torch.tensor(counts, device=device).cumsum(0)
    out = kernels.Int8Weight(iter(pairs)).grouped_mm(x, ends)
    start = 0
    for (q, scale), end in zip(pairs, ends.tolist()):
        alone = kernels.Int8Weight(iter([(q, scale)])).mm(x[start:end])
        assert torch.allclose(out[start:end], alone, rtol=1e-5, atol=1e-6)
        start = end


def test_fp8_scaled_mm_path_matches_its_dequantized_reference(monkeypatch):
    """The CUDA fp8 path (`torch._scaled_mm`, fp8 activations per token), run on CPU by torch's own op."""
    from blockdiff.quant import kernels
    from blockdiff.quant.modules import Fp8Linear
    monkeypatch.setattr(kernels, "select_fp8_kernel", lambda *a: "scaled-mm-fp8")
    torch.manual_seed(4)
    w = torch.randn(32, 64) * 0.05
    scale = w.abs().amax(1, keepdim=True) / 448
    q = (w / scale).to(torch.float8_e4m3fn)
    mod = Fp8Linear(64, 32, (32, 1))
    mod.load_state_dict({"weight": q, "weight_scale": scale}, assign=True)
    mod.pack_for_kernels()
    assert mod.kernel_weight.kernel == "scaled-mm-fp8"
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    out = mod(x)
    assert out.shape == (2, 5, 32) and out.dtype == torch.bfloat16
    assert rel(out, F.linear(x.float(), q.float() * scale)) < 0.06          # e4m3 activations: 3 mantissa bits


def expert_config(**kw) -> ModelConfig:
    return tiny_config(num_experts=6, top_k_experts=2, hidden_size=64, moe_intermediate_size=64, **kw)


@pytest.mark.parametrize("bits,kernel", [(4, None), (8, None), (8, "int-mm")])
def test_grouped_experts_match_the_per_expert_loop(monkeypatch, bits, kernel):
    if kernel:
        from blockdiff.quant import kernels
        monkeypatch.setattr(kernels, "select_int8_kernel", lambda *a: kernel)
    torch.manual_seed(2)
    cfg = expert_config()
    dense = Experts(cfg)
    torch.nn.init.normal_(dense.gate_up_proj, std=0.05)
    torch.nn.init.normal_(dense.down_proj, std=0.05)
    args = INT8 if bits == 8 else WeightArgs(4, 32)
    state, i = {}, cfg.moe_intermediate_size
    for e in range(cfg.num_experts):
        state.update(ct_tensors(f"{e}.gate_proj", dense.gate_up_proj[e, :i].detach(), args))
        state.update(ct_tensors(f"{e}.up_proj", dense.gate_up_proj[e, i:].detach(), args))
        state.update(ct_tensors(f"{e}.down_proj", dense.down_proj[e].detach(), args))
    experts = QuantExperts(cfg, args, args)
    experts.load_state_dict(state, assign=True)
    loop = {e: [quant_linear(w, args)[0] for w in (dense.gate_up_proj[e, :i].detach(), dense.gate_up_proj[e, i:].detach(),
                                                   dense.down_proj[e].detach())] for e in range(cfg.num_experts)}
    experts.pack_for_kernels()
    x = torch.randn(40, cfg.hidden_size)
    weights, idx = torch.rand(40, 2), torch.randint(0, cfg.num_experts - 1, (40, 2))   # the last expert gets no token
    with torch.no_grad():
        out = experts(x, weights, idx)
    ref = torch.zeros_like(x)
    for t in range(40):
        for j in sorted(range(2), key=lambda j: idx[t, j].item()):
            gate, up, down = loop[idx[t, j].item()]
            h = down(F.gelu(gate(x[t:t + 1]), approximate="tanh") * up(x[t:t + 1]))
            ref[t] += (h[0] * weights[t, j]).to(x.dtype)
    # int4: the same kernel on the same rows; int8: activations are quantized over each call's rows alike
    assert rel(out, ref) < 1e-5


SCHEMES = ("w8a8", "w4a16", "w4a16-experts")


@pytest.fixture(scope="module")
def tiny_packs(tmp_path_factory):
    """A tiny random bf16 checkpoint and its three quantized versions."""
    root = tmp_path_factory.mktemp("quant")
    src = create_random_model(root / "src", seed=1, dtype=torch.bfloat16)
    return src, {s: quantize(src, root / s, s, shard_bytes=40_000, progress=False) for s in SCHEMES}


def test_quantized_directory_layout(tiny_packs):
    src, packs = tiny_packs
    cfg = json.loads((packs["w4a16-experts"] / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["quantization_status"] == "compressed"
    assert q["format"] == "mixed-precision"
    formats = {g["format"]: g for g in q["config_groups"].values()}
    assert formats["int-quantized"]["input_activations"]["strategy"] == "token"
    assert any("experts" in t for t in formats["pack-quantized"]["targets"])
    index = json.loads((packs["w4a16-experts"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1                                 # sharded at 40 kB
    names = set(index)
    assert "model.decoder.layers.0.experts.3.down_proj.weight_packed" in names
    assert "model.decoder.layers.0.self_attn.q_proj.weight_scale" in names
    assert "model.decoder.embed_tokens.weight" in names and "model.decoder.layers.0.router.proj.weight" in names
    assert not any(n.startswith("model.encoder.language_model.") and "layer_scalar" not in n for n in names)
    assert (packs["w8a8"] / "tokenizer.json").is_file() and not list(src.parent.glob(".*partial*"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_load_generate(tiny_packs, scheme):
    src, packs = tiny_packs
    model = blockdiff.load_model(packs[scheme], dtype="float32")
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"QuantLinear", "QuantExperts"} <= kinds and type(model.layers[0].router.proj) is torch.nn.Linear
    dense = blockdiff.load_model(src, dtype="float32")
    ids, canvas = torch.randint(5, 200, (2, 12)), torch.randint(5, 200, (2, 16))
    assert torch.isfinite(model.block_logits(ids, canvas)).all()
    assert torch.equal(model.embed_tokens.weight, dense.embed_tokens.weight)
    with pytest.raises(ValueError, match="cannot be saved"):
        model.save_pretrained(tiny_packs[0].parent / "never")
    llm = blockdiff.LLM(packs[scheme], max_num_seqs=2, max_model_len=128)
    params = blockdiff.SamplingParams(max_tokens=24, seed=0, ignore_eos=True, max_denoising_steps=4)
    outs = llm.generate(["Hello", "The king"], params)
    assert [len(o.token_ids) for o in outs] == [24, 24]
    again = llm.generate(["The king"], params)
    assert again[0].token_ids == outs[1].token_ids                      # batch-independent, as for dense models


def test_every_quantized_weight_equals_the_source_dequantized(tiny_packs):
    """What load_model runs is the converter's quantization of the source weights, nothing else."""
    src, packs = tiny_packs
    dense = blockdiff.load_model(src, dtype="float32")
    model = blockdiff.load_model(packs["w4a16"], dtype="float32")
    for name in ("layers.1.self_attn.o_proj", "self_conditioning.down_proj", "layers.3.mlp.up_proj"):
        w = dense.get_submodule(name).weight
        args = WeightArgs(4, 128).for_input_size(w.shape[1], name)
        x = torch.randn(5, w.shape[1])
        ref = F.linear(x, dequantize_weight(*quantize_weight(w.bfloat16(), args)).float())
        assert rel(model.get_submodule(name)(x), ref) < 0.01


def test_default_model_quantized_generates(tmp_path):
    for scheme in ("w8a8", "w4a16"):
        pack = quantize(DEFAULT_MODEL, tmp_path / scheme, scheme, progress=False)
        llm = blockdiff.LLM(pack)
        out = llm.generate("It is a truth universally acknowledged",
                           blockdiff.SamplingParams(max_tokens=24, seed=0, max_denoising_steps=8))[0]
        assert 0 < len(out.token_ids) <= 24 and out.text.strip()


def test_bad_input_is_one_clear_error(tiny_packs, tmp_path):
    src, packs = tiny_packs
    with pytest.raises(ValueError, match="unknown quantization scheme 'w3'"):
        quantize(src, tmp_path / "a", "w3")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(packs["w8a8"], tmp_path / "b", "w4a16")
    with pytest.raises(FileExistsError, match="already exists"):
        quantize(src, packs["w8a8"], "w8a8")
    odd = create_random_model(tmp_path / "odd", tiny_config(hidden_size=40, head_dim=10, global_head_dim=20))
    with pytest.raises(ValueError, match=r"tensor 'model\.decoder\.layers\.0\.[a-z_.]+': no int4 group size .* divides its input size 40"):
        quantize(odd, tmp_path / "c", "w4a16", progress=False)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.partial*"))


def test_mixed_or_truncated_packs_name_the_tensor(tiny_packs, tmp_path):
    from safetensors.torch import load_file, save_file

    import shutil
    bad = shutil.copytree(tiny_packs[1]["w8a8"], tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.decoder.layers.2.mlp.down_proj.weight"
    shard = bad / index[key]
    tensors = load_file(shard)
    tensors[key] = tensors[key].to(torch.bfloat16)                      # a dense tensor in a quantized pack
    save_file(tensors, str(shard))
    with pytest.raises(blockdiff.checkpoint.CheckpointError, match=f"'{key}' has dtype bfloat16, expected int8"):
        blockdiff.load_model(bad)
    tensors.pop(f"{key[:-len('weight')]}weight_scale")
    tensors[key] = tensors[key].to(torch.int8)
    save_file(tensors, str(shard))
    with pytest.raises(blockdiff.checkpoint.CheckpointError, match=r"tensor '[a-z0-9_.]+down_proj\.weight_scale'"):
        blockdiff.load_model(bad)


def test_cli_quantize_and_generate(tiny_packs, tmp_path, capsys):
    from blockdiff.cli import main

    src, _ = tiny_packs
    assert main(["quantize", str(src), str(tmp_path / "x"), "--scheme", "int3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("blockdiff: error: unknown quantization scheme")
    assert main(["quantize", str(src), str(tmp_path / "q"), "--scheme", "w4a16-experts", "--no-progress"]) == 0
    assert main(["generate", "Hi", "--model", str(tmp_path / "q"), "--max-tokens", "8", "--max-denoising-steps", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_memory_check_counts_quantized_sizes(tiny_packs, monkeypatch):
    from blockdiff import checkpoint
    from blockdiff.hardware import LIGHT_SCHEMES
    from blockdiff.quant.scheme import SCHEMES as ALL

    assert tuple(ALL) == LIGHT_SCHEMES                    # the out-of-memory message names every scheme
    sizes = []
    monkeypatch.setattr(checkpoint, "check_fits", lambda nbytes, device, what: sizes.append(nbytes))
    src, packs = tiny_packs
    for path in (src, packs["w8a8"], packs["w4a16"]):
        blockdiff.load_model(path, dtype="bfloat16")
    assert sizes[0] > sizes[1] > sizes[2]
