"""Random checkpoints built directly in the quantized layout, and the released-shapes benchmark's
code path at tiny shapes (`bench --preset 26b-a4b --quant` runs it at the real ones)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import blockdiff
from blockdiff.bench_released import measure_released
from blockdiff.hf_layout import weight_files
from blockdiff.quant.convert import quantize
from blockdiff.quant.random_pack import write_random_pack
from blockdiff.random_model import create_random_model, tiny_config


def layout(path: Path) -> dict:
    out = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


@pytest.mark.parametrize("scheme,embedding", [("w4a16-experts", "bf16"), ("w8a8", "int8"), ("w4a16", "bf16")])
def test_random_pack_has_the_layout_quantize_writes(tmp_path, scheme, embedding):
    cfg = tiny_config()
    src = create_random_model(tmp_path / "src", cfg, seed=1, dtype=torch.bfloat16)
    ref = quantize(src, tmp_path / "q", scheme, progress=False, embedding=embedding)
    pack = write_random_pack(cfg, scheme, tmp_path / "r", embedding=embedding, shard_bytes=200_000)
    assert layout(pack) == layout(ref)
    assert len(weight_files(pack)) > 1                              # written shard by shard
    qc = [json.loads((p / "config.json").read_text())["quantization_config"] for p in (pack, ref)]
    assert qc[0] == qc[1]
    assert not list(tmp_path.glob(".r.partial-*"))


def test_random_pack_loads_and_generates(tmp_path):
    cfg = tiny_config()
    pack = write_random_pack(cfg, "w4a16-experts", tmp_path / "r", seed=3)
    model = blockdiff.load_model(pack, dtype=torch.bfloat16)
    hidden = model.denoise(torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length)), model.new_cache(1, 64))
    assert torch.isfinite(hidden).all() and hidden.float().std() > 0.1        # plausible scales: a live signal
    out = blockdiff.LLM(model, tokenizer=None).generate(
        [[5, 6, 7]], blockdiff.SamplingParams(max_tokens=2 * cfg.canvas_length, seed=0, max_denoising_steps=3,
                                              ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 2 * cfg.canvas_length


def check_report(res: dict, canvas: int) -> None:
    for key in ("peak_rss_gib", "weights_gb", "load_s", "step_s", "tok_per_s", "kv_cache_gib"):
        assert res[key] > 0, key
    assert res["tokens"] == canvas and res["steps_per_canvas"] == 2 and not res["peak_rss_includes_build"]
    assert res["peak_rss_gib"] >= res["rss_after_load_gib"] * 0.99


def test_released_bench_path_at_small_shapes(tmp_path):
    """Build in a child process, load, a long-context KV cache whose sliding layers keep a ring."""
    res = measure_released("w4a16-experts", "small", tmp_path, None, "cpu", steps=2, prompt_len=8, canvases=1,
                           max_model_len=8192)
    check_report(res, 64)
    assert res["dtype"] == "bfloat16" and res["max_model_len"] == 8192
    full_bytes = 6 * 2 * 8192 * 2 * 64 * 2                          # every layer keeping every position
    assert res["kv_cache_gib"] * 2**30 < full_bytes / 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_released_bench_path_on_cuda(tmp_path):
    res = measure_released("w4a16-experts", "small", tmp_path, None, "cuda", steps=2, prompt_len=8, canvases=1,
                           max_model_len=8192)
    check_report(res, 64)
    assert res["gpu_peak_gib"] > 0
