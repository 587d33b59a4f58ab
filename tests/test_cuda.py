"""GPU paths: skipped cleanly where CUDA is absent (these machines); run them on a GPU host."""
import pytest
import torch

import blockdiff
from blockdiff.random_model import create_random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("cuda") / "m", seed=4)


def test_block_logits_match_cpu(path):
    ids, canvas = torch.randint(5, 200, (2, 70)), torch.randint(0, 261, (2, 16))
    cpu = blockdiff.load_model(path).block_logits(ids, canvas)
    gpu = blockdiff.load_model(path, device="cuda").block_logits(ids.cuda(), canvas.cuda())
    assert (gpu.cpu() - cpu).abs().max().item() < 1e-3


def test_engine_on_cuda_bf16(path):
    llm = blockdiff.LLM(path, device="cuda")
    assert llm.model.dtype == torch.bfloat16
    params = [blockdiff.SamplingParams(max_tokens=20 + i, seed=i, max_denoising_steps=4, ignore_eos=True)
              for i in range(4)]
    outs = llm.generate([[5, 6, 7 + i] for i in range(4)], params)
    assert [len(o.token_ids) for o in outs] == [20, 21, 22, 23]
    again = llm.generate([[5, 6, 7]], params[0])[0]
    assert again.token_ids == outs[0].token_ids


def test_compiled_engine_on_cuda_matches_eager(path):
    """On CUDA the engine compiles by default; in fp32 it gives the eager engine's tokens."""
    model = blockdiff.load_model(path, dtype=torch.float32, device="cuda")
    eager = blockdiff.LLM(model, tokenizer=None, compile=False)
    params = [blockdiff.SamplingParams(max_tokens=40, seed=i, max_denoising_steps=4, ignore_eos=True,
                                       temperature=0.0 if i % 2 else 1.0) for i in range(3)]
    prompts = [[5, 6, 7 + i] * (i + 1) for i in range(3)]
    expected = [o.token_ids for o in eager.generate(prompts, params)]
    compiled = blockdiff.LLM(blockdiff.load_model(path, dtype=torch.float32, device="cuda"), tokenizer=None)
    assert compiled.compiled
    assert [o.token_ids for o in compiled.generate(prompts, params)] == expected


@pytest.mark.parametrize("args", ["int8", "int4-g128", "int4-g32"])
def test_low_bit_kernels_on_cuda_match_their_dequantized_reference(args):
    from blockdiff.quant.kernels import Int4Weight, Int8Weight
    from blockdiff.quant.scheme import WeightArgs, dequantize_weight, quantize_weight
    torch.manual_seed(0)
    w = torch.randn(96, 256, device="cuda") * 0.05
    bits, group = (8, None) if args == "int8" else (4, int(args.split("g")[1]))
    q, scale = quantize_weight(w, WeightArgs(bits, group, True) if bits == 8 else WeightArgs(bits, group))
    weight = Int8Weight([(q, scale)]) if bits == 8 else Int4Weight(1, [(q.to(torch.int32) + 8, scale)])
    assert weight.kernel == ("int-mm" if bits == 8 else "int4-tinygemm")
    ref_w = dequantize_weight(q, scale).float()
    for rows in (1, 40):
        x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
        out = weight.mm(x).float()
        ref = x.float() @ ref_w.t()
        assert ((out - ref).norm() / ref.norm()).item() < 0.02
    ends = torch.tensor([40], device="cuda")
    assert torch.equal(weight.grouped_mm(x, ends), weight.mm(x))


def test_fp8_linear_on_cuda_uses_fp8_matmuls():
    from blockdiff.quant.kernels import Fp8Weight
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmuls need sm89+")
    torch.manual_seed(0)
    w = torch.randn(64, 128, device="cuda") * 0.05
    scale = w.abs().amax(1, keepdim=True) / 448
    weight = Fp8Weight((w / scale).to(torch.float8_e4m3fn), scale, torch.bfloat16)
    assert weight.kernel == "scaled-mm-fp8"
    x = torch.randn(24, 128, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w.t()
    assert ((weight.mm(x).float() - ref).norm() / ref.norm()).item() < 0.06
