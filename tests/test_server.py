"""The OpenAI-compatible server, driven by the real `openai` client against uvicorn on 127.0.0.1.

Outputs are checked against the offline engine (same model, same SamplingParams, seed + choice
index), so "exact" means token-for-token, not just "looks plausible".
"""
import json
import time

import httpx
import openai
import pytest
from server_harness import KEY, MODEL, metric, running_server

from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.random_model import create_random_model

FAST = {"max_denoising_steps": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("server") / "m", seed=3)


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, max_num_seqs=4, max_queue=16) as s:
        yield s


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(model_dir, max_num_seqs=4, max_model_len=512)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def expected(offline, prompt, **params):
    return offline.generate([prompt], SamplingParams(**params))[0]


def raw_sse(server, body: dict) -> list[str]:
    """The `data:` payloads of a streaming response, in order, and a check of the framing."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200, r.read()
        text = r.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)      # no event: lines
    return [e[len("data: "):] for e in events]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}          # no key needed


def test_completion_is_exact(client, offline):
    """max_tokens and seed exact: the same tokens as the offline engine; same seed, same text."""
    ref = expected(offline, "Hello", max_tokens=37, seed=11, ignore_eos=True, **FAST)
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=37, seed=11,
                                  extra_body={"ignore_eos": True, **FAST})
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 37 and r.usage.prompt_tokens == len(ref.prompt_token_ids)
    timings = r.model_extra["blockdiff_timings"]
    assert timings["canvases"] == 3 and timings["denoising_steps"] == sum(ref.stats.steps_per_canvas)
    assert timings["tokens_per_second"] > 0 and timings["in_step_tokens_per_second"] > 0
    other = client.completions.create(model=MODEL, prompt="Hello", max_tokens=37, seed=12,
                                      extra_body={"ignore_eos": True, **FAST})
    assert other.choices[0].text != ref.text


def test_n_choices_use_seed_plus_index(client, offline):
    r = client.completions.create(model=MODEL, prompt=["ab", "xyz"], n=3, max_tokens=20, seed=5, extra_body=FAST)
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:
        ref = expected(offline, ["ab", "xyz"][c.index // 3], max_tokens=20, seed=5 + c.index, **FAST)
        assert (c.text, c.finish_reason) == (ref.text, ref.finish_reason)
    assert r.usage.prompt_tokens == 3 + 4               # each prompt once (BOS + bytes), whatever n is


def test_chat_uses_the_chat_template(client, offline):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    prompt = offline.tokenizer.apply_chat_template(messages)
    ref = expected(offline, prompt, max_tokens=48, seed=2, **FAST)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, seed=2, n=2, extra_body=FAST)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.choices[1].message.content == expected(offline, prompt, max_tokens=48, seed=3, **FAST).text


@pytest.mark.parametrize("seed", range(4))
def test_stream_equals_non_stream(client, seed):
    """Streamed deltas join to the exact final text (a split UTF-8 character would decode to U+FFFD
    on both sides and differ: random bytes are full of multi-byte lead bytes)."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "ok"}], max_tokens=60, seed=seed,
              extra_body={**FAST, "ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_framing_and_usage(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "seed": 1,
            "stream": True, "ignore_eos": True, **FAST}
    plain = raw_sse(server, body)
    assert plain[-1] == "[DONE]" and "usage" not in json.loads(plain[-2])
    with_usage = raw_sse(server, {**body, "stream_options": {"include_usage": True}})
    assert with_usage[-1] == "[DONE]"
    last = json.loads(with_usage[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 20
    assert last["blockdiff_timings"]["canvases"] == 2
    assert [json.loads(p)["choices"][0]["finish_reason"] for p in with_usage[:-2]][-1] == "length"


def test_stop_string_never_leaks_across_canvases(client, offline):
    """A stop string straddling the boundary of two canvases is cut, streamed or not."""
    prompt, params = "Hello", dict(max_tokens=64, seed=21, ignore_eos=True, **FAST)
    ref = expected(offline, prompt, **params)
    c = offline.model.config.canvas_length
    for b in (c, 2 * c, 3 * c):
        head = offline.tokenizer.decode(ref.token_ids[:b])
        stop = ref.text[len(head) - 2:len(head) + 2]
        if ref.text.startswith(head) and "\ufffd" not in stop and ref.text.find(stop) == len(head) - 2:
            break
    else:
        pytest.fail("no clean canvas boundary in the reference text; pick another seed")
    want = ref.text[:len(head) - 2]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=64, seed=21, stop=[stop, "@@never@@"],
              extra_body={"ignore_eos": True, **FAST})
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    deltas = [ch.choices[0].text for ch in client.completions.create(stream=True, **kw)]
    assert "".join(deltas) == want and not any(stop in d for d in deltas)


def test_knobs_reach_the_sampler(client, offline):
    r = client.completions.create(model=MODEL, prompt="a", max_tokens=32, seed=1,
                                  extra_body={"max_denoising_steps": 5, "fixed_steps": True, "ignore_eos": True})
    assert r.model_extra["blockdiff_timings"]["denoising_steps"] == 10            # 2 canvases x 5 steps
    knobs = {"max_denoising_steps": 3, "entropy_bound": 2.0, "t_min": 0.1, "t_max": 0.2, "top_k": 5,
             "confidence_threshold": 0.5, "stability_threshold": 0}
    ref = expected(offline, "a", max_tokens=32, seed=9, temperature=0.5, ignore_eos=True, **knobs)
    assert ref.text != expected(offline, "a", max_tokens=32, seed=9, ignore_eos=True).text
    r = client.completions.create(model=MODEL, prompt="a", max_tokens=32, seed=9, temperature=0.5,
                                  extra_body={"ignore_eos": True, **knobs})
    assert r.choices[0].text == ref.text


def test_frames_only_when_asked(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "f"}], max_tokens=32, seed=4, stream=True,
              extra_body={"max_denoising_steps": 6, "fixed_steps": True, "ignore_eos": True})
    assert not any("blockdiff_frame" in (c.model_extra or {}) for c in client.chat.completions.create(**kw))
    kw["extra_body"]["blockdiff_frames"] = {"max_fps": 240}
    chunks = list(client.chat.completions.create(**kw))
    frames = [c.model_extra["blockdiff_frame"] for c in chunks if "blockdiff_frame" in (c.model_extra or {})]
    assert len({(f["canvas"], f["step"]) for f in frames}) >= 2
    for c in chunks:
        if "blockdiff_frame" in c.model_extra:        # a harmless no-op chunk for the client
            assert c.choices[0].delta.content is None and c.choices[0].finish_reason is None
    f = frames[0]
    assert len(f["tokens"]) == len(f["token_ids"]) == len(f["accepted"]) == len(f["max_prob"]) == 16
    assert 1 <= f["step"] <= f["max_steps"] == 6 and all(0 <= p <= 1 for p in f["max_prob"])
    assert chunks[-1].choices[0].finish_reason == "length"


def test_frame_rate_is_capped(client):
    """At 2 frames/s a ~1 s generation carries a handful of frames, not one per step (~100)."""
    kw = dict(model=MODEL, prompt="r", max_tokens=64, seed=4, stream=True,
              extra_body={"max_denoising_steps": 25, "fixed_steps": True, "blockdiff_frames": {"max_fps": 2},
                                 "ignore_eos": True})
    t0 = time.monotonic()
    chunks = list(client.completions.create(**kw))
    elapsed = time.monotonic() - t0
    frames = [c for c in chunks if "blockdiff_frame" in (c.model_extra or {})]
    assert 1 <= len(frames) <= 2 * elapsed + 1 < 100
    assert chunks[-1].choices[0].finish_reason == "length"


BAD = [  # (body changes, status, param)
    ({"max_tokens": "5"}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"n": 0}, 400, "n"),
    ({"temperature": 2.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"seed": -1}, 400, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"logit_bias": {"5": 3}}, 400, "logit_bias"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"response_format": {"type": "xml"}}, 400, "response_format.type"),
    ({"frobnicate": 1}, 400, "frobnicate"),
    ({"max_denoising_steps": 0}, 400, "max_denoising_steps"),
    ({"t_min": 0.9, "t_max": 0.5}, 400, "t_max"),
    ({"entropy_bound": -1}, 400, "entropy_bound"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"blockdiff_frames": {"max_fps": 10}}, 400, "blockdiff_frames"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 99999]}, 400, "prompt"),
    ({"prompt": "x" * 600}, 400, "prompt"),                      # longer than max_model_len
    ({"max_tokens": 1000}, 400, "max_tokens"),                   # does not fit in the context
    ({"model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("change,status,param", BAD)
def test_errors_are_openai_bodies(server, change, status, param):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 8, **change}
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"model": NaN}', b"\xff\xfe", b""])
def test_malformed_bodies_are_400(server, content):
    r = httpx.post(server.url + "/v1/chat/completions", content=content, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_client_exception_types(server, client):
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt="x", logit_bias={"3": 1})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


@pytest.mark.parametrize("path", ["/v1/models", "/metrics"])
def test_api_key_required(server, path):
    assert httpx.get(server.url + path).status_code == 401
    assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_oversized_bodies_are_413(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    big = json.dumps({"model": MODEL, "prompt": "x" * (2 << 20)}).encode()
    assert httpx.post(server.url + "/v1/completions", content=big, headers=auth).status_code == 413

    def chunked():                      # no Content-Length: counted while reading
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    r = httpx.post(server.url + "/v1/completions", content=chunked(), headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="m", max_tokens=16, extra_body=FAST)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("blockdiff_requests_running", "blockdiff_requests_waiting", "blockdiff_committed_tokens_total",
                 "blockdiff_canvases_total", "blockdiff_denoising_steps_per_canvas_count",
                 "blockdiff_time_to_first_token_seconds_count", "blockdiff_request_latency_seconds_count"):
        assert f"\n{name} " in text or text.startswith(f"{name} "), name
    assert metric(text, "blockdiff_committed_tokens_total") >= 16 and metric(text, "blockdiff_canvases_total") >= 1
    assert metric(text, "blockdiff_requests_running") == 0
    assert 'blockdiff_http_errors_total{status="500"}' not in text


def test_playground_page_is_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and 'id="canvas"' in page.text and "http" not in page.text.split("<body>")[1]
    assert httpx.get(server.url + "/static/app.js").status_code == 200
