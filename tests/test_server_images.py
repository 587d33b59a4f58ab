"""Images over the API: the real `openai` client sends base64 images to a tiny multimodal checkpoint;
bad images are 400s naming the problem and the server stays healthy."""
import base64
import io

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from server_harness import KEY, MODEL, running_server

from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.random_model import create_random_model, tiny_vision_config

FAST = {"max_denoising_steps": 3}


def png_bytes(h=30, w=44, seed=0, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime="image/png"):
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url, text="What is this?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm_server")
    media = root / "media"
    media.mkdir()
    (media / "a.png").write_bytes(png_bytes(seed=4))
    return create_random_model(root / "m", tiny_vision_config(), seed=5), media


@pytest.fixture(scope="module")
def server(paths):
    model, media = paths
    with running_server(model, max_model_len=256, max_body_bytes=4 << 20) as s:
        s.llm.inputs.local_dir = media.resolve()        # as `serve --allowed-local-media-path`
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, body):
    return httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, **body}, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})


def test_openai_client_sends_a_base64_image(paths, server, client):
    url = data_url(png_bytes())
    resp = client.chat.completions.create(model=MODEL, messages=image_message(url), max_tokens=16, seed=3,
                                          extra_body=FAST)
    offline = LLM(paths[0], max_model_len=256)
    want = offline.chat(image_message(url), SamplingParams(max_tokens=16, seed=3, **FAST))[0]
    assert resp.choices[0].message.content == want.text
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)     # the image's soft tokens count
    text_only = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is this?"}],
                                               max_tokens=16, seed=3, extra_body=FAST)
    assert text_only.usage.prompt_tokens < resp.usage.prompt_tokens


@pytest.mark.parametrize("fmt,mime", [("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_jpeg_and_webp(server, fmt, mime):
    r = post(server, {"messages": image_message(data_url(png_bytes(fmt=fmt), mime)), "max_tokens": 1,
                      "max_denoising_steps": 1})
    assert r.status_code == 200, r.text


def test_local_files_only_under_the_allowed_directory(server, paths):
    ok = post(server, {"messages": image_message(f"file://{paths[1] / 'a.png'}"), "max_tokens": 4, **FAST})
    assert ok.status_code == 200
    r = post(server, {"messages": image_message(f"file://{paths[0] / 'config.json'}"), "max_tokens": 4})
    assert r.status_code == 400 and "must name a file under" in r.json()["error"]["message"]


@pytest.mark.parametrize("url,message", [
    ("https://example.com/cat.png", "not fetched"),
    ("http://169.254.169.254/latest", "not fetched"),
    ("data:image/gif;base64,R0lGODlhAQABAAAAACw=", "unsupported image type 'image/gif'"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"garbage").decode(), "not a recognised image"),
    (data_url(png_bytes()[:200]), "corrupt or truncated"),
    ("ftp://x/y.png", "base64 data URL"),
])
def test_bad_images_are_400s_naming_the_problem(server, url, message):
    r = post(server, {"messages": image_message(url), "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"] and r.json()["error"]["param"] == "messages"
    assert httpx.get(server.url + "/health").status_code == 200


def test_too_many_images_and_placeholder_prompts(server):
    parts = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(8, 8))}}] * 5
    r = post(server, {"messages": [{"role": "user", "content": parts}], "max_tokens": 4})
    assert r.status_code == 400 and "at most 4" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "<|image|> hi"}, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "no images were given" in r.json()["error"]["message"]
    bad_part = [{"role": "user", "content": [{"type": "image_url", "image_url": "not-an-object"}]}]
    assert post(server, {"messages": bad_part}).status_code == 400


def test_images_to_a_text_only_checkpoint(tmp_path):
    with running_server(create_random_model(tmp_path / "t"), max_model_len=256) as s:
        r = post(s, {"messages": image_message(data_url(png_bytes(8, 8))), "max_tokens": 4})
        assert r.status_code == 400 and "takes text only" in r.json()["error"]["message"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 300), junk=st.binary(max_size=32))
def test_fuzzed_images_never_500(server, cut, junk):
    good = png_bytes(12, 12, seed=1)
    data = good[:cut] + junk + good[cut + len(junk):]
    r = post(server, {"messages": image_message(data_url(data)), "max_tokens": 1, "max_denoising_steps": 1})
    assert r.status_code in (200, 400), r.text
