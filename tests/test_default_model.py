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
