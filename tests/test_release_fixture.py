"""The release-shaped checkpoint as people download it: transformers reads the same files, and blockdiff's
logits, chat prompts, seeded generation, engine and server (by hub id, with the checkpoint's generation
defaults) agree with it."""
import json

import httpx
import openai
import pytest
import torch
from server_harness import KEY, MODEL, running_server

import blockdiff
from blockdiff.diffusion.noise import HashNoise
from blockdiff.engine.request import SamplingParams
from blockdiff.generation_config import read_generation_config
from blockdiff.tokenizer import Tokenizer
from release_fixture import GENERATION

REPO = "google/diffusiongemma-tiny"
KNOBS = {k: GENERATION[k] for k in ("max_denoising_steps", "t_min", "t_max", "stability_threshold",
                                    "confidence_threshold", "entropy_bound")}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city today",
                                           "parameters": {"type": "object", "required": ["city"],
                                                          "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = [
    ([{"role": "user", "content": "Hello there, king!"}], {}),
    ([{"role": "system", "content": " You are terse. "}, {"role": "user", "content": "Tell me a story"},
      {"role": "assistant", "content": "Once upon a time."}, {"role": "user", "content": "Été? 日本"}], {}),
    ([{"role": "user", "content": "What is the weather today?"}], {"tools": TOOLS}),
    ([{"role": "user", "content": "think"}], {"enable_thinking": True}),
    ([{"role": "user", "content": "no reply yet"}], {"add_generation_prompt": False}),
]


@pytest.fixture(scope="module")
def hf_model(release_dir):
    from hf_oracle import load_hf

    return load_hf(release_dir)                                  # fp32, eager attention and experts


def test_file_set_is_the_released_one(release_dir):
    names = {p.name for p in release_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "processor_config.json"} <= names
    weight_map = json.loads((release_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1                                          # sharded
    assert any(k.startswith("model.encoder.vision_tower.") for k in weight_map)      # vision under its names
    config = json.loads((release_dir / "config.json").read_text())
    assert config["eos_token_id"] == [1, 106] and config["text_config"]["vocab_size"] == 262144
    assert config["text_config"]["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]


def test_logits_equal_transformers(release_dir, hf_model):
    ours = blockdiff.load_model(release_dir, dtype="float32")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 262144, (2, 21), generator=gen)          # longer than the sliding window (16)
    canvas = torch.randint(0, 262144, (2, 8), generator=gen)
    with torch.no_grad():
        expected = hf_model(input_ids=prompt, decoder_input_ids=canvas).logits
    # |logits| reach the softcap (30) here: fp32 rounding of kernels that sum in another order
    torch.testing.assert_close(ours.block_logits(prompt, canvas), expected, atol=1e-4, rtol=1e-5)


def test_seeded_generation_equals_transformers(release_dir, hf_model):
    """transformers takes its defaults from generation_config.json; blockdiff's reference gets the same
    file's values through `read_generation_config`: token-identical under one seed."""
    ours = blockdiff.load_model(release_dir, dtype="float32")
    gen = read_generation_config(release_dir)
    prompt = torch.randint(3, 1000, (1, 13), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    expected = hf_model.generate(prompt, max_new_tokens=16).sequences
    torch.manual_seed(7)
    got = blockdiff.reference_generate(ours, prompt, max_new_tokens=16, eos_token_id=list(gen.eos_token_ids),
                                       pad_token_id=gen.pad_token_id, **KNOBS)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("messages, kwargs", CONVERSATIONS)
def test_chat_prompt_equals_transformers(release_dir, messages, kwargs):
    from transformers import AutoTokenizer

    hf, ours = AutoTokenizer.from_pretrained(release_dir), Tokenizer.from_dir(release_dir)
    kwargs = {"add_generation_prompt": True, **kwargs}
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert len(hf) == ours.vocab_size == 262144


def test_template_rejection_is_a_value_error(release_dir):
    ours = Tokenizer.from_dir(release_dir)
    with pytest.raises(ValueError, match="system prompt must be the first message"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_engine_with_checkpoint_defaults_equals_reference(release_dir):
    llm = blockdiff.LLM(release_dir, dtype="float32", max_num_seqs=2, max_model_len=128)
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}]))
    out = llm.generate([prompt], SamplingParams(max_tokens=12, seed=5, ignore_eos=True))[0]   # knobs unset
    ref = blockdiff.reference_generate(llm.model, torch.tensor([prompt]), max_new_tokens=16, noise=HashNoise([5]),
                                       return_output=True, **KNOBS)
    assert out.token_ids == ref.sequences[0, len(prompt):len(prompt) + 12].tolist()
    assert out.stats.steps_per_canvas == ref.steps_per_canvas


def test_served_by_hub_id_with_checkpoint_defaults(hub_cache, release_dir):
    """The openai client against `LLM("google/...")` served: a chat with no knobs gets the checkpoint's
    generation defaults (the offline engine given the file's values explicitly, with the file ignored,
    writes the same text); a conversation the template rejects is a 400."""
    offline = blockdiff.LLM(release_dir, max_num_seqs=1, max_model_len=128, generation_config="none")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello king"}]
    prompt = offline.tokenizer.apply_chat_template(messages, enable_thinking=True)
    expected = offline.generate(prompt, SamplingParams(max_tokens=16, seed=4, ignore_eos=True, **KNOBS))[0]
    with running_server(REPO, max_num_seqs=2, max_model_len=128) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, seed=4,
                                           extra_body={"ignore_eos": True,
                                                       "chat_template_kwargs": {"enable_thinking": True}})
        assert r.choices[0].message.content == expected.text
        assert r.usage.prompt_tokens == len(offline.tokenizer.encode(prompt))
        bad = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": MODEL, "messages": [{"role": "user", "content": "a"},
                                                            {"role": "system", "content": "b"}]})
        assert bad.status_code == 400 and "system prompt must be the first" in bad.json()["error"]["message"]
