"""Tokenizer wrapper: load/save, special ids, encode/decode, chat templates, streaming decode.

A tiny byte-level BPE is trained once per session on ASCII-only text, so every non-ASCII
character below is spelled with several single-byte tokens: the hard case for streaming.
"""
import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from blockdiff.engine.output import OutputProcessor
from blockdiff.engine.request import Request, SamplingParams
from blockdiff.tokenizer import Tokenizer, render_fallback_chat

SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
ASCII_TEXT = ["the quick brown fox jumps over the lazy dog. " * 4, "hello world, hello there!"] * 20
UNICODE_TEXT = "Café naïve 🎉 déjà vu — 日本語 ok"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(ASCII_TEXT, trainer)
    path = tmp_path_factory.mktemp("tok")
    Tokenizer(backend, {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "pad_token": "<pad>"}).save(path)
    return path


@pytest.fixture
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def test_special_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)


def test_eos_ids_include_end_of_turn(tok):
    assert tok.eos_ids == [1, 4]


def test_save_load_round_trip_keeps_ids(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    assert again.vocab_size == tok.vocab_size


def test_encode_adds_bos_only_when_asked(tok):
    assert tok.encode("hello")[0] == tok.bos_id
    assert tok.bos_id not in tok.encode("hello", add_bos=False)


def test_encode_does_not_double_bos_written_in_text(tok):
    assert tok.encode("<bos>hello").count(tok.bos_id) == 1


def test_decode_round_trips_unicode(tok):
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_decode_keeps_specials_when_asked(tok):
    assert tok.decode(tok.encode("hi"), skip_special=False) == "<bos>hi"


def test_missing_directory_error_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_missing_tokenizer_json_error_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_eos_must_be_in_vocab(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.from_dir(tmp_path)


MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_fallback_chat_template_is_gemma_style(tok):
    assert tok.apply_chat_template(MESSAGES) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>model\n")


def test_fallback_chat_template_without_generation_prompt():
    assert not render_fallback_chat(MESSAGES, add_generation_prompt=False).endswith("<start_of_turn>model\n")


def test_chat_markers_encode_as_single_tokens(tok):
    ids = tok.encode(tok.apply_chat_template(MESSAGES[:1]), add_bos=False)
    assert ids[0] == 3 and ids.count(4) == 1


def test_jinja_chat_template_is_rendered(tok):
    pytest.importorskip("jinja2")
    tok.config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[model]{% endif %}")
    assert tok.apply_chat_template(MESSAGES) == "<bos>[user]Hi[assistant]Hello![model]"


def test_chat_template_rejects_malformed_message(tok):
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])


def test_streamed_text_never_splits_a_utf8_character(tok):
    """The engine's output processor, fed one id per canvas, streams whole characters only."""
    ids = tok.encode(UNICODE_TEXT, add_bos=False)
    assert len(ids) > len(UNICODE_TEXT.encode()) // 2  # multi-byte characters really are split
    proc = OutputProcessor(tok.decode, {tok.eos_id})
    req = Request("r", [0], SamplingParams(max_tokens=len(ids)), seed=0)
    pieces = [proc.on_canvas(req, [i]).delta_text for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == UNICODE_TEXT
