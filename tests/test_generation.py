"""User-facing text generation and the CLI: max_tokens, EOS, stop strings, seeds, errors."""
import subprocess
import sys

import pytest

import blockdiff
from blockdiff.diffusion.params import DiffusionParams
from blockdiff.engine.output import TextState
from blockdiff.generation import generate_text
from blockdiff.random_model import create_random_model
from blockdiff.tokenizer import Tokenizer

FAST = DiffusionParams(max_denoising_steps=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = create_random_model(tmp_path_factory.mktemp("demo") / "m", seed=5)
    return path, blockdiff.load_model(path), Tokenizer.from_dir(path)


def text_state(max_tokens=10, stop=()):
    return TextState(lambda ids: "".join(chr(96 + i) for i in ids), {1}, max_tokens, stop)


def test_text_state_eos_and_length():
    st = text_state()
    st.add([5, 6, 1, 7])
    assert (st.ids, st.finish_reason, st.text) == ([5, 6], "stop", "ef")
    st = text_state(max_tokens=3)
    st.add([5, 6, 7, 1])                        # EOS beyond the limit does not count
    assert (st.ids, st.finish_reason) == ([5, 6, 7], "length")


def test_text_state_stop_string_across_canvases_never_leaks():
    st = text_state(max_tokens=50, stop=("xyz",))
    deltas = [st.add([1 + 2, 4]), st.add([24, 25]), st.add([26, 5])]   # "cd" "xy" "ze"
    assert st.finish_reason == "stop" and st.text == "cd"
    assert "".join(deltas) == "cd" and all("x" not in d for d in deltas)
    assert st.ids == [3, 4]


def test_text_state_holds_back_partial_utf8():
    data = "é".encode()
    st = TextState(lambda ids: bytes(ids).decode("utf-8", errors="replace"), set(), 10)
    assert st.add([data[0]]) == ""              # half a character: nothing to stream yet
    assert st.add([data[1]]) == "é"


@pytest.mark.parametrize("max_tokens", [1, 5, 16, 17])
def test_max_tokens_is_exact(demo, max_tokens):
    _, model, tok = demo
    out = generate_text(model, tok, "Hello", max_tokens=max_tokens, params=FAST, seed=1)
    assert len(out.token_ids) <= max_tokens
    if out.finish_reason == "length":
        assert len(out.token_ids) == max_tokens
    assert tok.decode(out.token_ids) == out.text


def test_same_seed_same_text(demo):
    _, model, tok = demo
    a = generate_text(model, tok, "Hello", max_tokens=20, params=FAST, seed=11)
    b = generate_text(model, tok, "Hello", max_tokens=20, params=FAST, seed=11)
    c = generate_text(model, tok, "Hello", max_tokens=20, params=FAST, seed=12)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stop_string_ends_text(demo):
    _, model, tok = demo
    full = generate_text(model, tok, "Hello", max_tokens=40, params=FAST, seed=3)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    out = generate_text(model, tok, "Hello", max_tokens=40, params=FAST, seed=3, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.find(stop)]
    assert stop not in out.text


def test_token_id_prompt_and_bad_prompts(demo):
    _, model, tok = demo
    assert generate_text(model, tok, [2, 50, 60], max_tokens=4, params=FAST).finish_reason in ("stop", "length")
    with pytest.raises(ValueError, match="empty"):
        generate_text(model, tok, [], max_tokens=4)
    with pytest.raises(ValueError, match="token ids"):
        generate_text(model, tok, [99999], max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        generate_text(model, tok, "x", max_tokens=0)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "blockdiff.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_generate(demo):
    path, model, tok = demo
    run = cli("generate", "Hello", "--model", str(path), "--max-tokens", "12", "--steps", "3", "--seed", "4")
    assert run.returncode == 0, run.stderr
    expected = generate_text(model, tok, "Hello", max_tokens=12, params=FAST, seed=4).text
    assert run.stdout == expected + "\n"


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--model", "/does/not/exist"], "does not exist"),
    (["generate", "x", "--steps", "0"], "max_denoising_steps"),
    (["generate", "x", "--max-tokens", "-3"], "max_tokens"),
    (["generate", "x", "--steps", "many"], "invalid int value"),
])
def test_cli_errors_are_one_line(demo, args, message):
    path = demo[0]
    if "--model" not in args:
        args = args + ["--model", str(path)]
    run = cli(*args)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr


def test_cli_help_explains_options():
    run = cli("generate", "--help")
    assert run.returncode == 0
    for flag in ("--model", "--max-tokens", "--steps", "--seed", "--temperature", "--stop"):
        assert flag in run.stdout
