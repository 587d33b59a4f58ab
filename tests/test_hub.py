"""Hub ids, generation_config.json defaults, memory check and bad checkpoints; no network (offline cache)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import blockdiff
from blockdiff import hardware
from blockdiff.cli import main
from blockdiff.config import ConfigError
from blockdiff.diffusion.params import BUILT_IN
from blockdiff.engine.request import SamplingParams
from blockdiff.generation_config import read_generation_config
from blockdiff.hub import METADATA_FILES, resolve_model
from release_fixture import GENERATION, install_in_hub_cache

REPO = "google/diffusiongemma-tiny"


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "blockdiff.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


# ---- resolution ---------------------------------------------------------------------------------
def test_hub_id_resolves_to_the_cached_snapshot(hub_cache):
    cache, snapshot = hub_cache
    assert resolve_model(REPO) == snapshot
    assert resolve_model(REPO, revision=snapshot.name) == snapshot            # a commit
    assert (resolve_model(REPO, files=METADATA_FILES) / "config.json").is_file()


def test_revision_by_branch(hub_cache, release_dir):
    cache, _ = hub_cache
    other = install_in_hub_cache(release_dir, cache, REPO, commit="ab" * 20, ref="v2")
    assert resolve_model(REPO, revision="v2") == other
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        resolve_model(REPO, revision="v3")


def test_unknown_id_offline_is_a_clear_error(hub_cache):
    with pytest.raises(FileNotFoundError, match="google/nothing-here is not a local directory, not in the Hugging "
                                                "Face cache .*HF_HUB_OFFLINE"):
        resolve_model("google/nothing-here")


def test_paths_and_non_ids(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="revision"):
        resolve_model(tmp_path, revision="main")


def test_llm_loads_by_hub_id_like_by_path(hub_cache, release_dir):
    by_id = blockdiff.LLM(REPO, dtype="float32", max_num_seqs=1, max_model_len=64)
    by_path = blockdiff.LLM(release_dir, dtype="float32", max_num_seqs=1, max_model_len=64)
    sp = SamplingParams(max_tokens=8, seed=3, ignore_eos=True, max_denoising_steps=2)
    assert by_id.generate("hello", sp)[0].token_ids == by_path.generate("hello", sp)[0].token_ids
    assert by_id.tokenizer.vocab_size == 262144


# ---- generation_config.json ---------------------------------------------------------------------
def test_generation_config_is_read_as_released(release_dir):
    gen = read_generation_config(release_dir)
    expected = {k: GENERATION[k] for k in ("max_denoising_steps", "t_min", "t_max", "stability_threshold",
                                           "confidence_threshold", "entropy_bound")}
    assert {k: getattr(gen.params, k) for k in expected} == expected
    assert gen.eos_token_ids == (1, 106, 50) and gen.pad_token_id == 0 and gen.max_new_tokens == 16
    assert read_generation_config(release_dir.parent).params.unset    # no file: nothing set


@pytest.mark.parametrize("change, message", [
    ({"num_beams": 4}, "unsupported field.*num_beams"),
    ({"top_p": 1.5}, "top_p"),
    ({"sampler_config": {"_cls_name": "OtherSampler"}}, "sampler_config"),
    ({"t_min": 0.95}, "t_max"),
    ({"eos_token_id": "x"}, "eos_token_id"),
    ({"max_denoising_steps": 0}, "max_denoising_steps"),
])
def test_bad_generation_config_names_file_and_field(release_dir, tmp_path, change, message):
    data = json.loads((release_dir / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**data, **change}))
    with pytest.raises(ConfigError, match=f"generation_config.json: .*{message}"):
        read_generation_config(tmp_path)


def test_priority_request_over_flags_over_checkpoint_over_built_in(release_dir):
    llm = blockdiff.LLM(release_dir, dtype="float32", max_num_seqs=1, max_model_len=64,
                        sampling_defaults=SamplingParams(entropy_bound=0.3))
    d = llm.defaults
    assert (d.max_denoising_steps, d.t_min, d.t_max, d.stability_threshold) == (5, 0.3, 0.9, 2)   # checkpoint
    assert d.entropy_bound == 0.3                                                                  # server flag
    assert (d.temperature, d.fixed_steps, d.top_k, d.top_p) == (1.0, False, 0, 1.0)                # built-in
    assert llm.output.eos_ids >= {1, 106, 50}
    req = SamplingParams(max_denoising_steps=2).with_defaults(d)                                   # request
    assert (req.max_denoising_steps, req.t_min, req.entropy_bound) == (2, 0.3, 0.3)
    none = blockdiff.LLM(release_dir, dtype="float32", max_num_seqs=1, max_model_len=64, generation_config="none")
    assert none.defaults == SamplingParams.built_in() and 50 not in none.output.eos_ids


def test_a_request_clashing_with_a_default_names_the_field():
    with pytest.raises(ValueError, match="t_max"):
        SamplingParams(t_min=0.9).with_defaults(SamplingParams.built_in())
    assert SamplingParams().unset and SamplingParams.built_in().unset == ["seed"]     # a seed is drawn per request
    assert SamplingParams.built_in().with_defaults(BUILT_IN) == SamplingParams.built_in()


def test_max_new_tokens_is_a_default_not_a_cap(release_dir):
    llm = blockdiff.LLM(release_dir, dtype="float32", max_num_seqs=1, max_model_len=128)
    fast = dict(seed=1, ignore_eos=True, max_denoising_steps=1)
    unset, more = llm.generate(["hello"] * 2, [SamplingParams(**fast), SamplingParams(max_tokens=21, **fast)])
    assert len(unset.token_ids) == GENERATION["max_new_tokens"] == 16
    assert len(more.token_ids) == 21


def test_eos_outside_vocabulary_is_rejected(release_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(release_dir, bad)
    data = json.loads((bad / "generation_config.json").read_text())
    (bad / "generation_config.json").write_text(json.dumps({**data, "eos_token_id": [1, 300000]}))
    with pytest.raises(ConfigError, match="eos_token_id.*outside the vocabulary"):
        blockdiff.LLM(bad, dtype="float32", max_num_seqs=1, max_model_len=64)


# ---- memory check and bad checkpoints -----------------------------------------------------------
def test_memory_check_refuses_before_loading(release_dir, monkeypatch, capsys):
    monkeypatch.setattr(hardware, "free_memory_bytes", lambda device: 1_000_000)
    with pytest.raises(hardware.NotEnoughMemory, match=r"need 0\.\d+ GB on cpu and 0\.00 GB is free.*w4a16-experts"):
        blockdiff.load_model(release_dir, dtype="float32")
    assert main(["generate", "x", "--model", str(release_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blockdiff: error: the weights of") and "blockdiff quantize --scheme w8a8" in err
    assert blockdiff.load_model(release_dir, dtype="float32", check_memory=False).config.vocab_size == 262144


def broken_copies(release_dir, tmp_path):
    missing_shard = tmp_path / "missing_shard"
    shutil.copytree(release_dir, missing_shard)
    next(missing_shard.glob("model-00002-*.safetensors")).unlink()
    disagree = tmp_path / "disagree"
    shutil.copytree(release_dir, disagree)
    config = json.loads((disagree / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 24
    (disagree / "config.json").write_text(json.dumps(config))
    stale_index = tmp_path / "stale_index"
    shutil.copytree(release_dir, stale_index)
    index = json.loads((stale_index / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.decoder.norm.weight"] = "model-00001-of-00002.safetensors"     # it is in 00002
    (stale_index / "model.safetensors.index.json").write_text(json.dumps(index))
    bad_template = tmp_path / "bad_template"
    shutil.copytree(release_dir, bad_template)
    (bad_template / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    return {"missing_shard": (missing_shard, "shard .* is missing"),
            "disagree": (disagree, "has shape .*expected"),
            "stale_index": (stale_index, "index puts tensor 'model.decoder.norm.weight' in model-00001.*00002"),
            "bad_template": (bad_template, "chat template failed to render")}


def test_bad_inputs_are_one_line_exit_2(release_dir, tmp_path, hub_cache, capsys):
    cases = broken_copies(release_dir, tmp_path)
    runs = [(["--model", "google/no-such-model"], "not in the Hugging Face cache"),
            (["--model", str(release_dir), "--chat-template", str(tmp_path / "nope.jinja")], "nope.jinja"),
            *[(["--model", str(path), "--chat"], message) for path, message in cases.values()]]
    for args, message in runs:
        assert main(["generate", "x", "--max-tokens", "1", "--max-denoising-steps", "1", *args]) == 2, args
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("blockdiff: error:")]
        assert len(lines) == 1 and re.search(message, lines[0]), (message, err)
    run = cli("generate", "x", "--model", "google/no-such-model", env={**os.environ})   # the real entry point
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("blockdiff: error: google/no-such-model is not a local")


def test_serve_takes_the_model_positionally_or_by_flag(release_dir):
    from blockdiff.cli import build_parser
    from blockdiff.cli.common import model_name, model_path, sampling_params

    parse = build_parser().parse_args
    args = parse(["serve", REPO, "--max-denoising-steps", "7", "--generation-config", "none"])
    assert model_path(args) == REPO and model_name(REPO) == REPO and args.generation_config == "none"
    flags = sampling_params(args)                       # the server's layer: only what was given
    assert flags.max_denoising_steps == 7 and flags.t_min is None and flags.max_tokens is None
    assert model_path(parse(["serve", "--model", str(release_dir)])) == str(release_dir)
    assert model_name(str(release_dir)) == release_dir.name
    with pytest.raises(ValueError, match="given twice"):
        model_path(parse(["serve", REPO, "--model", str(release_dir)]))
