"""One bad request fails alone: limits equal to the engine's, faults isolated in the step, and the
hostile-client cases (surrogates, impossible capacity, malformed HTTP, slow headers) answered with
OpenAI error bodies, never a 500."""
import asyncio
import json
import logging
import socket
import time

import httpx
import openai
import pytest
from server_harness import KEY, MODEL, running_server

from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.random_model import create_random_model

AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"model": MODEL, "prompt": "the same tokens", "max_tokens": 32, "temperature": 0, "seed": 11, "ignore_eos": True,
          "max_denoising_steps": 6, "fixed_steps": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("iso") / "m", seed=6)


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, max_num_seqs=4, max_queue=4, max_model_len=256, header_timeout=1.0) as s:
        yield s


def post(server, body, route="completions", **kw):
    return httpx.post(f"{server.url}/v1/{route}", json=body, headers=AUTH, timeout=60, **kw)


# ---- the engine: a fault inside a step fails only its request --------------------------------------
def poison(llm: LLM, bad_token: int) -> None:
    """Make the model raise whenever a batch holds a request whose prompt contains `bad_token`:
    in its prefill, and in every denoising step it takes part in."""
    model, runner = llm.model, llm.runner
    encode, denoise = model.encode_with, model.denoise_with
    poisoned_slots = set()

    def encode_with(ids, positions, ctx, *a, **k):
        if ids.shape[0] == 1 and int(positions[0, 0]) == 0:        # a prompt's prefill (not a commit)
            slot = int(ctx.slots[0])
            (poisoned_slots.add if (ids == bad_token).any() else poisoned_slots.discard)(slot)
        return encode(ids, positions, ctx, *a, **k)

    def denoise_with(canvas, positions, ctx, *a, **k):
        if poisoned_slots & set(ctx.slots.tolist()):
            raise RuntimeError("injected fault")
        return denoise(canvas, positions, ctx, *a, **k)

    model.encode_with, model.denoise_with = encode_with, denoise_with
    runner.model = model


def test_a_failing_request_fails_alone(model_dir):
    params = [SamplingParams(max_tokens=40, seed=s, max_denoising_steps=3, ignore_eos=True) for s in (1, 2, 3)]
    alone = LLM(model_dir, dtype="float32").generate([[5, 6, 7], [8, 9], [10, 11, 12, 13]], params)
    llm = LLM(model_dir, dtype="float32")
    poison(llm, bad_token=99)
    outs = llm.generate([[5, 6, 7], [8, 99], [8, 9], [10, 11, 12, 13]], [params[0], params[1], params[1], params[2]])
    assert outs[1].finish_reason == "error" and "injected fault" in outs[1].error and outs[1].finished
    good = [outs[0], outs[2], outs[3]]
    assert [o.token_ids for o in good] == [o.token_ids for o in alone]
    assert all(o.finish_reason == "length" for o in good)
    assert llm.scheduler.kv.tokens[llm.scheduler.kv.busy.index(False)] is not None and not llm.has_unfinished()


def test_failed_request_leaves_no_reusable_prefix(model_dir):
    llm = LLM(model_dir, dtype="float32", max_num_seqs=1)
    poison(llm, bad_token=99)
    out = llm.generate([[4, 99, 4, 4]], SamplingParams(max_tokens=8, max_denoising_steps=2))[0]
    assert out.finish_reason == "error" and llm.scheduler.kv.tokens == [[]]


def test_engine_limits_are_validated_offline():
    for bad, field in [({"stability_threshold": 5}, "stability_threshold"), ({"top_k": 2**63}, "top_k"),
                       ({"entropy_bound": 1e39}, "entropy_bound"), ({"t_max": 1e39}, "t_max"),
                       ({"confidence_threshold": 1e39}, "confidence_threshold"), ({"seed": 2**64}, "seed"),
                       ({"max_denoising_steps": 513}, "max_denoising_steps")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)


# ---- the server: bad requests are 400s and never touch a running one -------------------------------
@pytest.mark.parametrize("extra, param", [
    ({"stability_threshold": 5}, "stability_threshold"), ({"top_k": 2**63}, "top_k"),
    ({"entropy_bound": 1e39}, "entropy_bound"), ({"confidence_threshold": 1e39}, "confidence_threshold"),
    ({"t_max": 1e39}, "t_max"), ({"t_min": 1e39}, "t_min"), ({"max_denoising_steps": 513}, "max_denoising_steps"),
])
def test_out_of_range_knob_is_400_and_running_request_is_untouched(server, extra, param):
    alone = post(server, GREEDY).json()["choices"][0]["text"]

    async def both():
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
            good = asyncio.create_task(client.post(server.url + "/v1/completions", json=GREEDY))
            await asyncio.sleep(0.05)
            bad = await client.post(server.url + "/v1/completions", json={**GREEDY, "max_tokens": 4, **extra})
            return await good, bad

    good, bad = asyncio.run(both())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == param
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == alone


def test_engine_fault_fails_only_its_http_request(model_dir, caplog):
    with running_server(model_dir, max_num_seqs=4, max_queue=4) as server:
        poison(server.llm, bad_token=99)
        alone = post(server, {**GREEDY, "prompt": [5, 6, 7]}).json()["choices"][0]["text"]

        async def both():
            async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
                good = asyncio.create_task(client.post(server.url + "/v1/completions",
                                                       json={**GREEDY, "prompt": [5, 6, 7]}))
                await asyncio.sleep(0.05)
                bad = await client.post(server.url + "/v1/completions", json={**GREEDY, "prompt": [8, 99]})
                return await good, bad

        with caplog.at_level(logging.ERROR):
            good, bad = asyncio.run(both())
        assert bad.status_code == 500 and "injected fault" in bad.json()["error"]["message"]
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == alone
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]      # one fault, logged once
        assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("body, route, param", [
    ({"model": MODEL, "prompt": "\ud800"}, "completions", "prompt"),
    ({"model": MODEL, "prompt": ["ok", "\udfff"]}, "completions", "prompt.1"),
    ({"model": "\ud800", "prompt": "x"}, "completions", "model"),
    ({"model": MODEL, "prompt": "x", "stop": ["\ud800"]}, "completions", "stop.0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]},
     "chat/completions", "messages.0.content.0.text"),
])
def test_lone_surrogates_are_400(server, body, route, param):
    r = httpx.post(f"{server.url}/v1/{route}", content=json.dumps(body), headers={**AUTH, "content-type":
                                                                                  "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert "Unicode" in r.json()["error"]["message"]


def test_unknown_content_part_type_says_so(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}
    r = post(server, body, "chat/completions")
    assert r.status_code == 400 and "'audio' is not supported" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages.0.content.0.type"


def test_request_that_can_never_fit_is_400_not_429(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="at most 8"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, n=9)
    with pytest.raises(openai.BadRequestError, match="does not fit"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)


def raw_http(server, data: bytes, wait: float = 5.0) -> bytes:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_malformed_http_gets_an_openai_body(server):
    answer = raw_http(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_partial_headers_time_out(server):
    t0 = time.monotonic()
    answer = raw_http(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")     # never finished
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 4.0
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


def test_large_prompt_does_not_block_the_event_loop(server):
    """Tokenizing ~0.9 MB happens off the event loop: /health answers while it runs."""
    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
            t0 = time.monotonic()
            big = asyncio.create_task(client.post(server.url + "/v1/completions",
                                                  json={"model": MODEL, "prompt": "word " * 180_000, "max_tokens": 1}))
            await asyncio.sleep(0.05)
            health = await client.get(server.url + "/health")
            health_at = time.monotonic() - t0
            answer = await big
            return health, health_at, answer, time.monotonic() - t0

    health, health_at, big, big_at = asyncio.run(run())
    assert health.status_code == 200 and big.status_code == 400       # the prompt is over the context
    assert health_at < 0.5 * big_at, (health_at, big_at)                 # not queued behind the tokenizer
