"""Image markers in prompts: chat-template placement, expansion to begin/N image tokens/end, prefix keys."""
import numpy as np
import pytest
from PIL import Image

from blockdiff.image_processor import ImageProcessor
from blockdiff.image_prompt import ImageTokens, expand_image_tokens, image_spans, prefix_keys, process_images
from blockdiff.random_model import create_random_model, tiny_vision_config
from blockdiff.tokenizer import Tokenizer

TOKENS = ImageTokens(image=9, begin=7, end=8)


def picture(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_expand_places_each_image_where_its_marker_is():
    assert expand_image_tokens([1, 9, 2, 9], [2, 3], TOKENS) == [1, 7, 9, 9, 8, 2, 7, 9, 9, 9, 8]
    with pytest.raises(ValueError, match="1 image placeholder\\(s\\) but 2 image\\(s\\)"):
        expand_image_tokens([1, 9, 2], [2, 3], TOKENS)
    with pytest.raises(ValueError, match="2 image placeholder"):
        expand_image_tokens([9, 9], [1], TOKENS)


def test_chat_template_puts_the_marker_at_the_image_part(tmp_path):
    path = create_random_model(tmp_path / "m", tiny_vision_config())
    tok = Tokenizer.from_dir(path)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look: "},
                                             {"type": "image_url", "image_url": {"url": "data:..."}},
                                             {"type": "text", "text": " what is it?"}]}]
    text = tok.apply_chat_template(messages)
    assert text == "<start_of_turn>user\nLook: <|image|> what is it?<end_of_turn>\n<start_of_turn>model\n"
    proc = ImageProcessor.from_dir(path)
    images = process_images([picture(30, 50)], proc, max_images=4)
    ids = expand_image_tokens(tok.encode(text), images.num_soft_tokens, ImageTokens(
        tok.token_to_id("<|image|>"), tok.token_to_id("<|image>"), tok.token_to_id("<image|>")))
    n = images.num_soft_tokens[0]
    start = ids.index(tok.token_to_id("<|image>"))
    assert ids[start + 1:start + 1 + n] == [tok.token_to_id("<|image|>")] * n
    assert ids[start + 1 + n] == tok.token_to_id("<image|>")


def test_jinja_template_sees_image_parts(tmp_path):
    path = create_random_model(tmp_path / "m", tiny_vision_config())
    tok = Tokenizer.from_dir(path)
    tok.config["chat_template"] = ("{% for m in messages %}{% for p in m.content %}"
                                   "{% if p.type == 'image' %}[IMG]{% else %}{{ p.text }}{% endif %}"
                                   "{% endfor %}{% endfor %}")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert tok.apply_chat_template(messages) == "[IMG]hi"


def test_bad_content_parts_are_value_errors(tmp_path):
    tok = Tokenizer.from_dir(create_random_model(tmp_path / "m"))
    with pytest.raises(ValueError, match="unsupported message content part"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match="string or a list"):
        tok.apply_chat_template([{"role": "user", "content": 3}])


def test_too_many_images():
    with pytest.raises(ValueError, match="at most 1"):
        process_images([picture(8, 8), picture(8, 8)], ImageProcessor(4, 2, 70), max_images=1)


def test_prefix_keys_tell_images_apart():
    proc = ImageProcessor(4, 2, 70)
    a, b = process_images([picture(20, 20, 1)], proc, 2), process_images([picture(20, 20, 2)], proc, 2)
    again = process_images([picture(20, 20, 1)], proc, 2)
    ids = expand_image_tokens([1, 9, 2], a.num_soft_tokens, TOKENS)
    assert prefix_keys(ids, a, 9) == prefix_keys(ids, again, 9)
    ka, kb = prefix_keys(ids, a, 9), prefix_keys(ids, b, 9)
    assert ka[:2] == kb[:2] and ka[2] != kb[2]          # same text up to the first image token
    assert image_spans(ids, 9) == [(2, 2 + a.num_soft_tokens[0])]
