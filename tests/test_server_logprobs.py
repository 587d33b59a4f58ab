"""Logprobs over HTTP with the real `openai` client: completions and chat, whole and streamed, and the 400s.

The values are checked against the offline engine's entries for the same request and seed.
"""
import openai
import pytest
from server_harness import KEY, MODEL, running_server

from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.random_model import create_random_model

FAST = {"max_denoising_steps": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("server_logprobs") / "m", seed=3)


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, max_num_seqs=4) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_completions_logprobs_whole_and_streamed(client, model_dir):
    kw = dict(model=MODEL, prompt="Hello", max_tokens=37, seed=11, logprobs=2, extra_body=FAST)
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == r.usage.completion_tokens == 37
    ref = LLM(model_dir).generate(["Hello"], SamplingParams(max_tokens=37, seed=11, logprobs=2, **FAST))[0]
    assert lp.token_logprobs == pytest.approx([next(iter(e.values())).logprob for e in ref.logprobs], abs=1e-6)
    assert lp.text_offset == ref.text_offsets
    assert all(1 <= len(top) <= 3 and max(top.values()) <= 0 for top in lp.top_logprobs)
    assert all(t in top and max(top.values()) >= v for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    text, tokens, values, offsets, tops = "", [], [], [], []
    for chunk in client.completions.create(**kw, stream=True):
        c = chunk.choices[0]
        text += c.text
        if c.logprobs is not None:
            tokens += c.logprobs.tokens
            values += c.logprobs.token_logprobs
            offsets += c.logprobs.text_offset
            tops += c.logprobs.top_logprobs
            assert all(o <= len(text) for o in c.logprobs.text_offset)     # no entry ahead of its text
        else:
            assert not c.text
    assert (text, tokens, values, offsets, tops) == (r.choices[0].text, lp.tokens, lp.token_logprobs,
                                                     lp.text_offset, lp.top_logprobs)


def check_content(content, text: str, n: int) -> None:
    assert all(len(item.top_logprobs) == n for item in content)
    assert all(item.top_logprobs[0].logprob >= item.logprob for item in content)
    assert all([t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
               for item in content)
    # the tokens' own bytes rebuild the text (byte tokens split characters; special tokens have no text)
    spoken = b"".join(bytes(item.bytes) for item in content if not item.token.startswith("<"))
    assert spoken.decode("utf-8", errors="replace") == text


def test_chat_logprobs_whole_and_streamed(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=40, seed=5, logprobs=True,
              top_logprobs=3, extra_body=FAST)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 40
    check_content(content, r.choices[0].message.content, 3)
    text, streamed, usage = "", [], None
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.delta.content or ""
            streamed += c.logprobs.content if c.logprobs else []
            assert (c.logprobs is None) == (c.delta.role == "assistant")     # every chunk past the role chunk
    assert text == r.choices[0].message.content and usage.completion_tokens == len(streamed)
    assert [x.model_dump() for x in streamed] == [x.model_dump() for x in content]
    plain = client.chat.completions.create(**{**kw, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == text


@pytest.mark.parametrize("body, param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": 3}, "logprobs"),
])
def test_chat_logprobs_limits_are_400s(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       extra_body=body)
    assert e.value.body["param"] == param


@pytest.mark.parametrize("value", [21, -1, True])
def test_completions_logprobs_limits_are_400s(client, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body={"logprobs": value})
    assert e.value.body["param"] == "logprobs"


def test_a_stop_string_drops_the_entries_it_cuts(client):
    kw = dict(model=MODEL, prompt="Hello", max_tokens=48, seed=7, logprobs=1, extra_body=FAST)
    free = client.completions.create(**kw).choices[0]
    stop = free.text[20:23]
    assert len(stop) == 3 and stop not in free.text[:20]
    text, tokens, usage = "", [], None
    for chunk in client.completions.create(**kw, stop=[stop], stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.text
            tokens += c.logprobs.tokens if c.logprobs else []
    assert text == free.text[:20] and len(tokens) == usage.completion_tokens < 48
    assert tokens == free.logprobs.tokens[:len(tokens)]
