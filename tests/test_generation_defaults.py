"""A checkpoint's generation_config.json sets the defaults of `generate`, `serve` and `eval`; an explicit
flag or request field wins. Tiny random model: its canvases never reach the early-stop entropy, so a
canvas runs exactly `max_denoising_steps` steps and the step count shows which setting applied."""
import json

import httpx
import openai
import pytest
from server_harness import KEY, MODEL, running_server

from blockdiff.cli import main
from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.generation_config import read_generation_config
from blockdiff.random_model import create_random_model

FILE = {"max_denoising_steps": 3, "temperature": 0.5, "t_max": 0.9, "top_k": 7, "top_p": 0.95,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.2}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = create_random_model(tmp_path_factory.mktemp("gen") / "m", seed=4)
    (path / "generation_config.json").write_text(json.dumps(FILE))
    return path


@pytest.fixture(scope="module")
def offline(model_dir):
    """The same model with the file ignored: what the file's values give when passed explicitly."""
    return LLM(model_dir, max_num_seqs=2, max_model_len=256, generation_config="none")


def explicit(**over) -> SamplingParams:
    knobs = {k: v for k, v in FILE.items() if k != "sampler_config"}
    return SamplingParams(max_tokens=16, seed=0, ignore_eos=True, entropy_bound=0.2, **{**knobs, **over})


def test_file_sets_every_knob(model_dir):
    params = read_generation_config(model_dir).params
    assert (params.max_denoising_steps, params.temperature, params.t_max, params.top_k, params.top_p,
            params.entropy_bound) == (3, 0.5, 0.9, 7, 0.95, 0.2)
    with pytest.raises(ValueError, match="top_p"):
        read_generation_config(_write(model_dir.parent / "bad", {"top_p": 2.0}))


def _write(path, data):
    path.mkdir(exist_ok=True)
    (path / "generation_config.json").write_text(json.dumps(data))
    return path


def test_engine_defaults_come_from_the_file_and_requests_win(model_dir):
    llm = LLM(model_dir, max_num_seqs=2, max_model_len=256)
    assert (llm.defaults.max_denoising_steps, llm.defaults.temperature, llm.defaults.top_k) == (3, 0.5, 7)
    prompt = SamplingParams(max_tokens=32, seed=0, ignore_eos=True)
    assert llm.generate(["Hi"], prompt)[0].stats.steps_per_canvas == [3, 3]
    over = SamplingParams(max_tokens=32, seed=0, ignore_eos=True, max_denoising_steps=5)
    assert llm.generate(["Hi"], over)[0].stats.steps_per_canvas == [5, 5]
    ignored = LLM(model_dir, max_num_seqs=2, max_model_len=256, generation_config="none")
    assert ignored.generate(["Hi"], prompt)[0].stats.steps_per_canvas == [48, 48]      # the built-in value


def test_generate_cli_uses_the_file_and_flags_win(model_dir, offline, capsys):
    base = ["generate", "Hi", "--model", str(model_dir), "--max-tokens", "16", "--dtype", "float32"]
    assert main(base) == 0
    from_file = capsys.readouterr().out
    want = offline.generate(["Hi"], explicit())[0]
    assert from_file == want.text + "\n"
    assert main(base + ["--max-denoising-steps", "9", "--temperature", "1.5"]) == 0
    flagged = capsys.readouterr().out
    want_flagged = offline.generate(["Hi"], explicit(max_denoising_steps=9, temperature=1.5))[0]
    assert flagged == want_flagged.text + "\n" and want_flagged.text != want.text


def test_server_and_playground_defaults_come_from_the_file(model_dir):
    with running_server(model_dir, max_num_seqs=2) as server:
        models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        shown = models["data"][0]["blockdiff_sampling_defaults"]
        assert (shown["max_denoising_steps"], shown["temperature"], shown["entropy_bound"]) == (3, 0.5, 0.2)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=48, seed=0, extra_body={"ignore_eos": True})
        assert r.model_extra["blockdiff_timings"]["denoising_steps"] == 3 * 3
        r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=48, seed=0,
                                      extra_body={"ignore_eos": True, "max_denoising_steps": 4})
        assert r.model_extra["blockdiff_timings"]["denoising_steps"] == 3 * 4


def test_eval_samples_with_the_file_and_params_win(model_dir, tmp_path):
    from blockdiff.train.evaluate import evaluate

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "val.jsonl").write_text(json.dumps({"text": "It was a bright cold day in April. " * 4}) + "\n")

    class CountingJudge:
        def perplexity(self, texts):
            return float(len(texts))

    res = evaluate(model_dir, corpus, CountingJudge(), samples=1, max_tokens=16, val_batches=0)
    assert res["steps"] == 3 and res["sampler"]["temperature"] == 0.5 and res["sampler"]["top_k"] == 7
    res = evaluate(model_dir, corpus, CountingJudge(), samples=1, max_tokens=16, val_batches=0,
                   params=SamplingParams(max_denoising_steps=6, temperature=0.0))
    assert res["steps"] == 6 and res["sampler"]["temperature"] == 0.0 and res["sampler"]["top_k"] == 7


@pytest.mark.parametrize("budget_mb", [256, 0.01])          # materialised vocabulary / streamed in tiles
def test_min_tokens_bars_end_of_sequence(tmp_path, budget_mb):
    """The token the model writes first is made an end-of-sequence id: without min_tokens the output
    ends at once; with it, no end-of-sequence id appears before min_tokens tokens (across canvases)."""
    path = create_random_model(tmp_path / "m", seed=4)
    first = LLM(path, max_num_seqs=1, max_model_len=256).generate(
        [5, 6, 7], SamplingParams(max_tokens=8, seed=0, ignore_eos=True, max_denoising_steps=4))[0].token_ids[0]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [first], "min_new_tokens": 0}))
    llm = LLM(path, max_num_seqs=2, max_model_len=256, sampler_memory_mb=budget_mb)
    canvas = llm.model.config.canvas_length
    base = SamplingParams(max_tokens=3 * canvas, seed=0, max_denoising_steps=4)
    ended = llm.generate([5, 6, 7], base)[0]
    assert ended.finish_reason == "stop" and len(ended.token_ids) == 0
    n = canvas + 3                                          # bars all of the first canvas and part of the second
    out = llm.generate([[5, 6, 7], [5, 6, 7]], [SamplingParams(min_tokens=n, seed=s).with_defaults(base)
                                                  for s in (0, 1)])
    for o in out:
        assert len(o.token_ids) >= n and first not in o.token_ids[:n]
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=-1)


def test_min_new_tokens_in_the_file_is_the_default(tmp_path):
    path = create_random_model(tmp_path / "m", seed=4)
    (path / "generation_config.json").write_text(json.dumps({"min_new_tokens": 5}))
    assert read_generation_config(path).params.min_tokens == 5
    assert LLM(path, max_num_seqs=1, max_model_len=256).defaults.min_tokens == 5
