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
