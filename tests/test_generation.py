"""User-facing text: max_tokens, EOS, stop strings, seeds, streaming text rules, and the CLI."""
import subprocess
import sys

import pytest

import blockdiff
from blockdiff.engine.output import OutputProcessor
from blockdiff.engine.request import Request
from blockdiff.random_model import create_random_model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = create_random_model(tmp_path_factory.mktemp("demo") / "m", seed=5)
    return path, blockdiff.LLM(path, dtype="float32")


def letters(ids):
    return "".join(chr(96 + i) for i in ids)


def feed(max_tokens=10, stop=(), decode=letters, eos=(1,)):
    """An output processor and a request; returns `add(canvas) -> delta` and the request."""
    proc = OutputProcessor(decode, set(eos))
    req = Request("r", [2], blockdiff.SamplingParams(max_tokens=max_tokens, stop=stop), seed=0)
    return (lambda canvas: proc.on_canvas(req, canvas).delta_text), req


def test_output_eos_and_length():
    add, req = feed()
    add([5, 6, 1, 7])
    assert (req.output_ids, req.finish_reason, req.text) == ([5, 6], "stop", "ef")
    add, req = feed(max_tokens=3)
    add([5, 6, 7, 1])                           # EOS beyond the limit does not count
    assert (req.output_ids, req.finish_reason) == ([5, 6, 7], "length")


def test_output_stop_string_across_canvases_never_leaks():
    add, req = feed(max_tokens=50, stop=("xyz",))
    deltas = [add([1 + 2, 4]), add([24, 25]), add([26, 5])]   # "cd" "xy" "ze"
    assert req.finish_reason == "stop" and req.text == "cd"
    assert "".join(deltas) == "cd" and all("x" not in d for d in deltas)
    assert req.output_ids == [3, 4]


def test_output_holds_back_partial_utf8():
    data = "é".encode()
    add, _ = feed(decode=lambda ids: bytes(ids).decode("utf-8", errors="replace"), eos=())
    assert add([data[0]]) == ""                 # half a character: nothing to stream yet
    assert add([data[1]]) == "é"


def sp(**kw):
    return blockdiff.SamplingParams(max_denoising_steps=3, **kw)


@pytest.mark.parametrize("max_tokens", [1, 5, 16, 17])
def test_max_tokens_is_exact(demo, max_tokens):
    llm = demo[1]
    out = llm.generate("Hello", sp(max_tokens=max_tokens, seed=1))[0]
    assert len(out.token_ids) <= max_tokens
    if out.finish_reason == "length":
        assert len(out.token_ids) == max_tokens
    assert llm.tokenizer.decode(out.token_ids) == out.text


def test_same_seed_same_text(demo):
    llm = demo[1]
    a, b, c = llm.generate(["Hello"] * 3, [sp(max_tokens=20, seed=11), sp(max_tokens=20, seed=11),
                                           sp(max_tokens=20, seed=12)])
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stop_string_ends_text(demo):
    llm = demo[1]
    full = llm.generate("Hello", sp(max_tokens=40, seed=3, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    out = llm.generate("Hello", sp(max_tokens=40, seed=3, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.find(stop)]
    assert stop not in out.text


def test_token_id_prompt_and_bad_prompts(demo):
    llm = demo[1]
    assert llm.generate([2, 50, 60], sp(max_tokens=4))[0].finish_reason in ("stop", "length")
    with pytest.raises(ValueError, match="non-empty"):
        llm.generate([[]], sp(max_tokens=4))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([99999], sp(max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens"):
        sp(max_tokens=0)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "blockdiff.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_generate(demo):
    path = demo[0]
    run = cli("generate", "Hello", "--model", str(path), "--max-tokens", "12", "--max-denoising-steps", "3", "--seed", "4",
              "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    llm = blockdiff.LLM(path, dtype="float32")
    expected = llm.generate("Hello", blockdiff.SamplingParams(max_tokens=12, max_denoising_steps=3, seed=4))[0]
    assert run.stdout == expected.text + "\n"


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--model", "/does/not/exist"], "does not exist"),
    (["generate", "x", "--max-denoising-steps", "0"], "max_denoising_steps"),
    (["generate", "x", "--top-p", "0"], "top_p"),
    (["generate", "x", "--max-tokens", "-3"], "max_tokens"),
    (["generate", "x", "--max-denoising-steps", "many"], "invalid int value"),
    (["generate", "x", "--tensor-parallel-size", "3"], "must divide num_attention_heads"),
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
    for flag in ("--model", "--max-tokens", "--max-denoising-steps", "--seed", "--temperature", "--stop"):
        assert flag in run.stdout
