"""Server reliability: bounded load, a fuzz of request bodies, disconnects, timeouts, SIGTERM."""
import asyncio
import collections
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import KEY, MODEL, free_port, metric, running_server

from blockdiff.random_model import create_random_model

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("load") / "m", seed=4)


def metrics_of(server) -> str:
    return httpx.get(server.url + "/metrics", headers=AUTH).text


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_64_concurrent_streams_against_a_small_queue(model_dir):
    """4 slots + 8 queued: every stream completes correctly or gets 429; no 500; still healthy."""
    with running_server(model_dir, max_num_seqs=4, max_queue=8) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

        async def one(i):
            t0 = time.monotonic()
            try:
                stream = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=32, seed=i,
                    stream=True, stream_options={"include_usage": True}, extra_body={"max_denoising_steps": 4})
                chunks = [c async for c in stream]
            except openai.RateLimitError:
                return "429", None, None
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
            assert finish in (["stop"], ["length"]) and usage.completion_tokens <= 32
            assert finish != ["length"] or usage.completion_tokens == 32
            return "ok", (i, text), time.monotonic() - t0

        async def run_all():
            t0 = time.monotonic()
            results = await asyncio.gather(*(one(i) for i in range(64)))
            return results, time.monotonic() - t0

        results, wall = asyncio.run(run_all())
        ok = [r for r in results if r[0] == "ok"]
        rejected = len(results) - len(ok)
        assert len(ok) >= 12 and rejected > 0                   # capacity 12 served, the rest refused
        # Each stream's finish reason and usage were checked in one(). Same-seed equality with a lone run is
        # checked in test_server.py and the engine's batch-invariance test; under this load's arbitrary batch
        # shapes bf16 kernels can differ in the last bit (see issue #4's notes), so it is not asserted here.
        text = metrics_of(server)
        assert httpx.get(server.url + "/health").status_code == 200
        assert 'status="500"' not in text and server.engine.in_flight == 0
        assert metric(text, "blockdiff_requests_running") == 0 and metric(text, "blockdiff_requests_waiting") == 0
        latencies = sorted(r[2] for r in ok)
        print(json.dumps({"clients": 64, "ok": len(ok), "rejected_429": rejected, "wall_s": round(wall, 2),
                          "p50_s": round(statistics.median(latencies), 3), "max_s": round(latencies[-1], 3)}))


def test_queue_admits_up_to_capacity(model_dir):
    """Exactly slots + queue concurrent requests: all wait their turn and succeed, none is refused."""
    with running_server(model_dir, max_num_seqs=2, max_queue=4) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

        async def run_all():
            return await asyncio.gather(*(client.completions.create(
                model=MODEL, prompt="q", max_tokens=16, seed=i, extra_body={"max_denoising_steps": 3})
                for i in range(6)))
        assert all(r.choices[0].finish_reason in ("stop", "length") for r in asyncio.run(run_all()))


JUNK = [None, True, 0, -1, 2**64, 1e308, -0.0, "", "x", "\ud800", [], [1, "a"], {}, {"a": [None]}, [[[]]]]
# field: (values the server must accept, values it must refuse with a 400 or 404)
FIELDS = {
    "model": ([MODEL], ["other", "", "\ud800", 5]),
    "prompt": (["hi", ["a", "b"], [5, 6, 7], [[5], [6, 7]], "é" * 3],
               ["", [], [-1], [2**63], "\ud800", ["ok", "\udfff"], ["a"] * 17, "w " * 3000]),
    "messages": ([[{"role": "user", "content": "hi"}], [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                  [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]],
                 [[], [{"role": "bot", "content": "x"}], [{"role": "user"}],
                  [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                  [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]]),
    "max_tokens": ([1, 5, 16], [0, -3, 10**9, 2**64, "8", 2.5]),
    "n": ([1, 2], [0, 9, 17, True]),
    "stream": ([True, False], ["yes"]),
    "stream_options": ([None], [{"include_usage": "yes"}, {"x": 1}]),
    "stop": (["a", ["\n", "x"], None], [[], [""], ["1"] * 5, ["\ud800"]]),
    "seed": ([0, 7, 2**62, None], [-1, 2**63, 2**64, 1.5]),
    "temperature": ([0, 0.7, 2, None], [2.01, -0.1, "hot", 1e39]),
    "top_p": ([0.5, 1, 1e-45, None], [0, 1.5]),
    "top_k": ([0, 3, 2**31, 2**63 - 1, None], [-1, 2**63, 2**70]),
    "ignore_eos": ([True, False, None], [0]),
    "fixed_steps": ([True, False, None], [1]),
    "entropy_bound": ([0.1, 5, 3.4e38, None], [0, -1, 1e39, 1e308]),
    "t_min": ([0.0, 0.1, None], [-1, 1e39]),
    "t_max": ([3, 3.4e38, None], [1e39]),
    "confidence_threshold": ([0.005, 1e-45, 3.4e38, None], [0, 1e39]),
    "stability_threshold": ([0, 1, 4, None], [5, 512, -1, 2**63]),
    "blockdiff_frames": ([None], [{"max_fps": 0}, {"fps": 1}]),
    "logit_bias": ([{}, None], [{"1": 2}]),
    "presence_penalty": ([0, 0.0, None], [1, False]),
    "response_format": ([{"type": "text"}, {"type": "json_object"}],
                        [{"type": "xml"}, {"type": "json_schema"}, {"type": "json_object", "json_schema": 1}]),
}
# the step count is always there and small when valid, so valid bodies stay cheap to serve
STEPS = ([1, 2, 4], [0, 513, 3.0, "2"])


def pick(rng: random.Random, pools: tuple[list, list], p_invalid: float):
    valid, invalid = pools
    if rng.random() >= p_invalid:
        return rng.choice(valid)
    return rng.choice(invalid) if rng.random() < 0.8 else rng.choice(JUNK)


def fuzz_body(rng: random.Random, route: str) -> dict:
    """A body near the valid ones: each field present with probability 0.3, now and then with a
    value on the wrong side of a limit, of the wrong type or invalid Unicode; sometimes an
    unknown field or a missing required one. About half the bodies are valid."""
    prompt = "prompt" if route == "completions" else "messages"
    body = {"model": pick(rng, FIELDS["model"], 0.03), prompt: pick(rng, FIELDS[prompt], 0.1),
            "max_denoising_steps": pick(rng, STEPS, 0.05)}
    for name, pools in FIELDS.items():
        if name not in body and name not in ("prompt", "messages") and rng.random() < 0.3:
            body[name] = pick(rng, pools, 0.1)
    if body.get("stream") is not True and body.get("stream_options") is not None:
        body.pop("stream_options")
    if rng.random() < 0.03:
        body[rng.choice(["extra", "\udc80", "Max_Tokens"])] = rng.choice(JUNK)
    if rng.random() < 0.03:
        body.pop(rng.choice(list(body)))
    return body


@pytest.fixture(scope="module")
def fuzz_server(model_dir):
    with running_server(model_dir, max_num_seqs=4, max_queue=60, max_model_len=64, request_timeout=60) as s:
        yield s


def check_answer(status: int, text: str, streamed: bool) -> None:
    assert status in (200, 400, 404), (status, text[:300])
    if status != 200:
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    elif streamed:
        assert text.endswith("data: [DONE]\n\n") and '"finish_reason":"' in text
    else:
        assert all(c["finish_reason"] in ("stop", "length") for c in json.loads(text)["choices"])


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_fuzz_request_bodies(fuzz_server, route):
    """1,200 generated bodies per endpoint, 16 in flight: never a 500 or 422, never a hang (the
    whole run is bounded), every answer a well-formed completion or an OpenAI error body."""
    rng = random.Random(route)
    bodies = [fuzz_body(rng, route) for _ in range(1200)]

    async def run_all():
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(headers={**AUTH, "content-type": "application/json"}, timeout=60) as client:
            async def one(body):
                async with limit:       # ensure_ascii JSON carries lone surrogates as \\ud800 escapes
                    r = await client.post(f"{fuzz_server.url}/v1/{route}", content=json.dumps(body))
                    return body, r.status_code, r.text
            return await asyncio.wait_for(asyncio.gather(*(one(b) for b in bodies)), timeout=400)

    answers = asyncio.run(run_all())
    for body, status, text in answers:
        check_answer(status, text, body.get("stream") is True)
    counts = collections.Counter(status for _, status, _ in answers)
    print(json.dumps({"route": route, "bodies": len(answers), **{str(k): v for k, v in sorted(counts.items())}}))
    assert counts[200] >= 100 and counts[400] >= 100          # both sides of the validation were exercised
    assert httpx.get(fuzz_server.url + "/health").status_code == 200 and fuzz_server.engine.in_flight == 0


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzz_raw_bytes(fuzz_server, raw):
    r = httpx.post(f"{fuzz_server.url}/v1/chat/completions", content=raw, headers=AUTH, timeout=30)
    check_answer(r.status_code, r.text, False)


LONG = {"model": MODEL, "prompt": "long", "max_tokens": 480, "ignore_eos": True,
        "max_denoising_steps": 64, "fixed_steps": True}          # ~30 canvases x 64 steps: many seconds


FRAMES = {"blockdiff_frames": {"max_fps": 50}}    # a first line after one step, not one canvas


def test_disconnect_frees_the_slot(model_dir):
    with running_server(model_dir, max_num_seqs=1, max_queue=0) as server:
        with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True, **FRAMES}, headers=AUTH,
                          timeout=30) as r:
            lines = r.iter_lines()                    # (dropping this iterator would close the response)
            assert r.status_code == 200 and "blockdiff_frame" in next(lines)      # it is running
            assert metric(metrics_of(server), "blockdiff_requests_running") == 1
        wait_for(lambda: metric(metrics_of(server), 'blockdiff_requests_finished_total{reason="abort"}') == 1)
        assert metric(metrics_of(server), "blockdiff_requests_running") == 0 and server.engine.in_flight == 0
        with pytest.raises(httpx.ReadTimeout):        # a non-streaming client that gives up
            httpx.post(server.url + "/v1/completions", json=LONG, headers=AUTH, timeout=1.0)
        wait_for(lambda: metric(metrics_of(server), 'blockdiff_requests_finished_total{reason="abort"}') == 2)
        short = {"model": MODEL, "prompt": "s", "max_tokens": 8, "max_denoising_steps": 2}
        r = httpx.post(server.url + "/v1/completions", json=short, headers=AUTH, timeout=10)   # the one slot is free
        assert r.status_code == 200


def test_request_timeout(model_dir):
    with running_server(model_dir, max_num_seqs=2, request_timeout=0.5) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        body = {k: v for k, v in LONG.items() if k not in ("model", "prompt", "max_tokens")}
        with pytest.raises(openai.InternalServerError, match="did not finish"):              # 504
            client.completions.create(model=MODEL, prompt="t", max_tokens=480, extra_body=body)
        with pytest.raises(openai.APIError, match="did not finish"):                         # error chunk
            list(client.completions.create(model=MODEL, prompt="t", max_tokens=480, stream=True, extra_body=body))
        wait_for(lambda: metric(metrics_of(server), "blockdiff_requests_running") == 0)


SERVE = "import sys; from blockdiff.cli import main; sys.exit(main(sys.argv[1:]))"


def test_sigterm_lets_open_streams_finish(model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--model", str(model_dir), "--port", str(port),
                             "--served-model-name", MODEL, "--shutdown-timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url), timeout=60)
        body = {**LONG, "max_tokens": 64, "max_denoising_steps": 12, "stream": True, **FRAMES}   # ~1 s of work
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
        assert proc.wait(timeout=30) == 0             # a drained SIGTERM is a clean exit
        assert "Application shutdown complete" in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
