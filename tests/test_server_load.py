"""Server reliability: bounded load, a fuzz of request bodies, disconnects, timeouts, SIGTERM."""
import asyncio
import json
import os
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


JUNK = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=20), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                                max_size=4),
                    max_leaves=8)
FIELDS = {
    "model": st.sampled_from([MODEL, MODEL, "other", ""]) | JUNK,
    "prompt": st.sampled_from(["hi", "", ["a", "b"], [5, 6, 7], [[5], [6, 7]], [], [-1], "é" * 3]) | JUNK,
    "messages": st.sampled_from([[{"role": "user", "content": "hi"}], [], [{"role": "bot", "content": "x"}],
                                 [{"role": "user", "content": [{"type": "text", "text": "a"}]}]]) | JUNK,
    "max_tokens": st.sampled_from([1, 5, 16, 0, -3, 10**9, None, "8", 2.5]),
    "n": st.sampled_from([1, 2, 0, 17, None, True]),
    "stream": st.booleans() | JUNK,
    "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": "yes"}, {}, None]),
    "stop": st.sampled_from(["a", ["\n", "x"], [], [""], None, ["1"] * 5]) | JUNK,
    "seed": st.sampled_from([0, 7, -1, 2**62, 2**63, None]),
    "temperature": st.sampled_from([0, 0.7, 2, 2.01, -0.1, None, "hot"]),
    "top_p": st.sampled_from([0.5, 1, 0, 1.5, None]),
    "top_k": st.sampled_from([0, 3, -1, None]),
    "fixed_steps": st.sampled_from([True, False, None, 1]),
    "entropy_bound": st.sampled_from([0.1, 5, 0, -1, None]),
    "t_min": st.sampled_from([0.1, 0.9, -1, None]),
    "t_max": st.sampled_from([0.5, 0.05, 3, None]),
    "blockdiff_frames": st.sampled_from([{"max_fps": 30}, {"max_fps": 0}, {}, {"fps": 1}, None]),
    "logit_bias": st.sampled_from([{}, {"1": 2}, None]),
    "presence_penalty": st.sampled_from([0, 0.0, 1, False, None]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
}
# the step count is always there and small when valid, so valid bodies stay cheap to serve
STEPS = {"max_denoising_steps": st.sampled_from([1, 2, 4, 0, 513, None, 3.0, "2"])}
BODIES = st.fixed_dictionaries(STEPS, optional=FIELDS).flatmap(
    lambda d: st.dictionaries(st.text(max_size=6), JUNK, max_size=2).map(lambda extra: {**d, **extra})
    if d.get("max_tokens") == 1 else st.just(d))


@pytest.fixture(scope="module")
def fuzz_server(model_dir):
    with running_server(model_dir, max_num_seqs=4, max_queue=8, max_model_len=128, request_timeout=20) as s:
        yield s


def check_answer(r: httpx.Response, streamed: bool) -> None:
    assert r.status_code in (200, 400, 404), (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif streamed:
        assert r.text.endswith("data: [DONE]\n\n") and '"finish_reason":"' in r.text
    else:
        assert all(c["finish_reason"] in ("stop", "length") for c in r.json()["choices"])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES, route=st.sampled_from(["completions", "chat/completions"]))
def test_fuzz_request_bodies(fuzz_server, body, route):
    """Never a 500, never a hang: every body gets a well-formed answer within the timeout."""
    r = httpx.post(f"{fuzz_server.url}/v1/{route}", json=body, headers=AUTH, timeout=30)
    check_answer(r, body.get("stream") is True)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzz_raw_bytes(fuzz_server, raw):
    r = httpx.post(f"{fuzz_server.url}/v1/chat/completions", content=raw, headers=AUTH, timeout=30)
    check_answer(r, False)


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
        # uvicorn re-raises the captured SIGTERM once it has shut down cleanly
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
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
