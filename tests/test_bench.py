"""`blockdiff bench` runs end to end and keeps its contract: a table, a PNG, one JSON line last."""
import json

TINY = dict(num_hidden_layers=2, vocab_size=512, canvas_length=16, hidden_size=128, intermediate_size=128,
            moe_intermediate_size=64, layer_types=["sliding_attention", "full_attention"])


def test_bench_smoke(tmp_path, capsys, monkeypatch):
    from blockdiff import bench
    from blockdiff.cli import main

    monkeypatch.setitem(bench.PRESETS, "tiny", dict(bench.PRESETS["small"], **TINY))    # the command's code path, fast
    assert main(["bench", "--preset", "tiny", "--batch-sizes", "1,2", "--steps", "1", "--canvases", "1",
                 "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("speedup_vs_transformers_bs1", "speedup_vs_transformers_bs16", "diffusion_vs_ar_bs1",
                "matmul_fraction", "sampler_fraction", "peak_sampler_mem_mb", "fixed_bs2_tok_s", "adaptive_bs1_tok_s"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["sampler_mem_completed"] == 64
    assert (tmp_path / "bench_tiny.png").stat().st_size > 1000


def test_bench_quant_smoke(capsys, monkeypatch):
    from blockdiff import bench
    from blockdiff.cli import main

    monkeypatch.setitem(bench.PRESETS, "tiny", dict(bench.PRESETS["small"], **TINY))
    assert main(["bench", "--quant", "w4a16-experts", "--preset", "tiny", "--steps", "1", "--canvases", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("quant_speedup_bs1", "quant_speedup_bs16"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert 0 < res["weights_bytes"] < res["weights_bytes_bf16"]
    assert main(["bench", "--quant", "int3"]) == 2


def test_bench_structured_smoke(capsys, monkeypatch):
    from blockdiff import bench, bench_structured
    from blockdiff.cli import main

    tiny = dict(bench.PRESETS["small"], num_hidden_layers=2, canvas_length=16, hidden_size=64, intermediate_size=64,
                moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"])   # the default vocabulary
    monkeypatch.setitem(bench.PRESETS, "tiny", tiny)
    monkeypatch.setattr(bench_structured, "SUITE", bench_structured.SUITE[:2])
    assert main(["bench", "--structured", "--preset", "tiny", "--steps", "1", "--canvases", "1", "--seeds", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["validity"]["requests"] == 2 and res["validity"]["valid_stop"] == res["validity"]["stop"]
    assert res["overhead"]["constrained_vs_free"] > 0 and res["overhead"]["constrained_finish"] == ["length"]
