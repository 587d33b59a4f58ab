"""The engine with images: parity with the reference, batching, prefix reuse keyed on image content, bad input."""
import copy
import io

import numpy as np
import pytest
import torch

import blockdiff
from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.random_model import create_random_model, tiny_vision_config


@pytest.fixture(scope="module")
def mm_path(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("mm") / "m", tiny_vision_config(), seed=3)


def picture(h, w, seed):
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


SP = SamplingParams(max_tokens=20, seed=11, max_denoising_steps=3, ignore_eos=True)


def reference_with_image(llm, inputs, sp):
    """The reference sampler on the same ids and pixels (its own prefill path, HashNoise draws)."""
    model, c = llm.model, llm.model.config.canvas_length
    from blockdiff.diffusion.noise import HashNoise
    out = blockdiff.reference_generate(
        model, torch.tensor([inputs.ids]), max_new_tokens=-(-sp.max_tokens // c) * c,
        max_denoising_steps=sp.max_denoising_steps, noise=HashNoise([sp.seed]),
        pixel_values=inputs.images.pixel_values, image_position_ids=inputs.images.image_position_ids)
    return out[0, len(inputs.ids):len(inputs.ids) + sp.max_tokens].tolist()


def test_engine_with_image_equals_reference(mm_path):
    llm = LLM(mm_path, dtype="float32")
    prompt = {"prompt": "Look: <|image|> and <|image|>?", "multi_modal_data": {"image": [picture(30, 50, 1),
                                                                                       picture(60, 20, 2)]}}
    out = llm.generate(prompt, SP)[0]
    inputs = llm.inputs.process(prompt)
    assert inputs.ids.count(llm.model.config.image_token_id) == sum(inputs.images.num_soft_tokens)
    assert out.token_ids == reference_with_image(llm, inputs, SP)
    assert out.prompt_token_ids == inputs.ids
    text_only = llm.generate("Look:  and ?", SP)[0]
    assert text_only.token_ids != out.token_ids


def test_images_batch_and_prefix_reuse_keys_on_content(mm_path):
    """Requests with different images share the text prefix only; equal images share the image too.
    Every answer equals the same request run alone."""
    prompts = [{"prompt": "Describe <|image|> now", "multi_modal_data": {"image": picture(40, 40, s)}}
               for s in (5, 6, 5)]
    llm, solo = LLM(mm_path, dtype="float32", max_num_seqs=4), LLM(mm_path, dtype="float32", max_num_seqs=1)
    together = llm.generate(prompts, SP)
    alone = [solo.generate(p, SP)[0].token_ids for p in prompts[:2]]           # one request at a time
    assert [o.token_ids for o in together] == [alone[0], alone[1], alone[0]] and alone[0] != alone[1]
    image_id = llm.model.config.image_token_id
    other = {"prompt": "Describe <|image|> now", "multi_modal_data": {"image": picture(40, 40, 7)}}
    for prompt, reused in ((prompts[1], "image"), (other, "text")):
        inputs = llm.inputs.process(prompt)
        keys = blockdiff.image_prompt.prefix_keys(inputs.ids, inputs.images, image_id)
        alloc = copy.deepcopy(llm.scheduler.kv).allocate(keys)
        first_image = inputs.ids.index(image_id)
        assert alloc.reuse == (len(inputs.ids) if reused == "image" else first_image)
        fresh = solo.generate(prompt, SP)[0] if reused == "text" else together[1]
        assert llm.generate(prompt, SP)[0].token_ids == fresh.token_ids     # through the reused prefix


def test_chat_with_image_part(mm_path):
    llm = LLM(mm_path, dtype="float32")
    buf = io.BytesIO()
    picture(25, 35, 9).save(buf, format="PNG")
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in "},
                                             {"type": "image", "image": buf.getvalue()},
                                             {"type": "text", "text": "?"}]}]
    out = llm.chat(messages, SP)[0]
    assert len(out.token_ids) == SP.max_tokens
    ids = out.prompt_token_ids
    assert ids.count(llm.model.config.boi_token_id) == 1 and ids.count(llm.model.config.eoi_token_id) == 1


def test_images_count_toward_max_model_len(mm_path):
    llm = LLM(mm_path, dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        llm.generate({"prompt": "<|image|>", "multi_modal_data": {"image": picture(40, 40, 1)}}, SP)


def test_bad_image_requests_are_value_errors(mm_path, tmp_path):
    llm = LLM(mm_path, dtype="float32", max_images_per_prompt=1)
    two = {"prompt": "<|image|><|image|>", "multi_modal_data": {"image": [picture(9, 9, 1)] * 2}}
    cases = [(two, "at most 1"),
             ({"prompt": "<|image|>", "multi_modal_data": {"image": b"not an image"}}, "not a recognised image"),
             ({"prompt": "no marker", "multi_modal_data": {"image": picture(9, 9, 1)}}, "0 image placeholder"),
             ({"prompt": "<|image|> alone"}, "no images were given"),
             ({"prompt": "x", "multi_modal_data": {"video": 1}}, "only 'image'"),
             ({"prompt": "<|image|>", "multi_modal_data": {"image": "https://example.com/a.png"}}, "not fetched")]
    for prompt, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, SP)
    assert not llm.has_unfinished()
    text_only = LLM(create_random_model(tmp_path / "t"), dtype="float32")
    with pytest.raises(ValueError, match="takes text only"):
        text_only.generate({"prompt": "<|image|>", "multi_modal_data": {"image": picture(9, 9, 1)}}, SP)


def test_cli_generate_with_an_image(mm_path, tmp_path, capsys):
    """`generate --chat --image` prints what `LLM.chat` gives for the same image bytes."""
    from blockdiff.cli import main
    png = tmp_path / "p.png"
    picture(25, 35, 9).save(png)
    args = ["--model", str(mm_path), "--max-tokens", "8", "--max-denoising-steps", "2", "--seed", "4",
            "--dtype", "float32"]
    assert main(["generate", "What is this?", "--chat", "--image", str(png), *args]) == 0
    llm = LLM(mm_path, dtype="float32")
    messages = [{"role": "user", "content": [{"type": "image", "image": png.read_bytes()},
                                             {"type": "text", "text": "What is this?"}]}]
    want = llm.chat(messages, SamplingParams(max_tokens=8, max_denoising_steps=2, seed=4))[0]
    assert capsys.readouterr().out == want.text + "\n"
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["generate", "x", "--image", str(tmp_path / "bad.png"), *args]) == 2
    assert "blockdiff: error: image data" in capsys.readouterr().err
