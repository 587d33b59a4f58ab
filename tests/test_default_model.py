"""The embedded default model ships inside the package, loads, and generates text with no download."""
import blockdiff
from blockdiff.cli.common import DEFAULT_MODEL, default_model_dir


def test_default_model_is_bundled_and_generates():
    assert default_model_dir() == DEFAULT_MODEL
    llm = blockdiff.LLM(DEFAULT_MODEL)
    out = llm.generate("It is a truth universally acknowledged",
                       blockdiff.SamplingParams(max_tokens=24, seed=0, max_denoising_steps=8))[0]
    assert 0 < len(out.token_ids) <= 24 and out.text.strip()
    assert (DEFAULT_MODEL / "README.md").read_text().startswith("# blockdiff default model")


def test_first_command_writes_words_not_a_symbol():
    """The README's first command (defaults: the shipped generation_config.json, seed 0) writes at least
    `min_new_tokens` tokens of words, never an empty or one-symbol answer."""
    llm = blockdiff.LLM(DEFAULT_MODEL)
    assert llm.defaults.min_tokens == 32
    out = llm.generate("It is a truth universally acknowledged",
                       blockdiff.SamplingParams(seed=0, max_tokens=40, max_denoising_steps=8))[0]
    assert len(out.token_ids) >= 32 and len(out.text.split()) >= 5
