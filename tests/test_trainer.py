"""The trainer on a tiny model and a synthetic corpus: config validation, the schedule, falling loss,
exact resume, and 2-process torchrun (DDP and FSDP2 over gloo) against one process."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import blockdiff
from blockdiff.config import ConfigError
from blockdiff.train.trainer import TrainConfig, learning_rate, train

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
MODEL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             layer_types=["sliding_attention", "full_attention"], num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, global_head_dim=16, sliding_window=12, num_experts=2, top_k_experts=1,
             moe_intermediate_size=16, canvas_length=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A learnable token stream: the next token is (previous + 1) mod V nine times in ten."""
    path = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for split, n in (("train", 20_000), ("val", 4_000)):
        jumps = rng.random(n) < 0.1
        ids = np.zeros(n, dtype=np.int64)
        for i in range(1, n):
            ids[i] = rng.integers(VOCAB) if jumps[i] else (ids[i - 1] + 1) % VOCAB
        ids.astype(np.uint16).tofile(path / f"{split}.bin")
    (path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": VOCAB, "bos_id": 2, "eos_id": 1}))
    return path


def config(corpus, out, **overrides) -> TrainConfig:
    base = dict(out_dir=str(out), data_dir=str(corpus), model=dict(MODEL), seq_len=32, batch_size=8,
                micro_batch_size=4, max_steps=30, lr=3e-3, min_lr=3e-4, warmup_steps=3, log_every=1,
                eval_every=10, eval_batches=2, checkpoint_every=10)
    return TrainConfig.from_dict({**base, **overrides})


def losses(out: Path, kind: str = "train") -> list[float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss" if kind == "train" else "val_loss"] for r in records if r["kind"] == kind]


@pytest.mark.parametrize("overrides,message", [
    ({"bogus": 1}, "unknown train config field"),
    ({"lr": "fast"}, "'lr'"),
    ({"seq_len": 30}, "multiple of the model's canvas_length"),
    ({"batch_size": 6}, "multiple of 'micro_batch_size'"),
    ({"objective": "mdlm"}, "objective kind"),
    ({"model": {**MODEL, "hidden_size": 0}}, "hidden_size"),
    ({"attn_impl": "flash"}, "attn_impl"),
])
def test_config_validation_names_the_field(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, tmp_path, **overrides)


def test_config_files_in_repo_are_valid():
    for name in ("tiny", "default", "default_ar", "default_kd"):
        cfg = TrainConfig.from_file(ROOT / "configs" / f"{name}.json")
        assert cfg.model_config().vocab_size >= 256


def test_learning_rate_schedule(tmp_path):
    cfg = config(tmp_path, tmp_path, max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [learning_rate(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))               # monotone decay after warmup
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4) and lrs[100] == pytest.approx(1e-4)
    assert lrs[119] == pytest.approx(1e-4)


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_a_few_steps_lower_the_loss(corpus, tmp_path, objective):
    result = train(config(corpus, tmp_path, objective=objective))
    train_losses, val_losses = losses(tmp_path), losses(tmp_path, "val")
    start = (2 if objective == "diffusion" else 1) * math.log(VOCAB)   # decoder + encoder CE at init
    assert abs(train_losses[0] - start) < 0.3
    assert result.step == 30 and result.val_loss == val_losses[-1]
    assert val_losses[-1] < start - 0.5, val_losses
    assert (tmp_path / "loss.png").stat().st_size > 0 or not _has_matplotlib()


def test_resume_repeats_the_uninterrupted_run(corpus, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(config(corpus, whole, max_steps=12, checkpoint_every=4, eval_every=4))
    train(config(corpus, split, max_steps=12, checkpoint_every=4, eval_every=4), max_steps=6)
    assert json.loads((split / "checkpoint" / "trainer_state.json").read_text())["step"] == 6
    train(config(corpus, split, max_steps=12, checkpoint_every=4, eval_every=4), resume=True)
    assert losses(split) == losses(whole) and len(losses(whole)) == 12
    assert losses(split, "val") == losses(whole, "val")
    a, b = blockdiff.load_model(whole / "checkpoint"), blockdiff.load_model(split / "checkpoint")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_without_checkpoint_starts_fresh(corpus, tmp_path):
    result = train(config(corpus, tmp_path, max_steps=2), resume=True)
    assert result.step == 2 and len(losses(tmp_path)) == 2


@pytest.fixture(scope="module", params=[False, True], ids=["fp32", "bf16"])
def one_process(corpus, tmp_path_factory, request):
    """4 steps of 8 sequences in one process: 2 micro-batches of 4, accumulated."""
    out = tmp_path_factory.mktemp("one")
    train(config(corpus, out, max_steps=4, eval_every=2, checkpoint_every=4, bf16=request.param))
    return out, request.param


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_two_processes_match_one(corpus, one_process, tmp_path, fsdp):
    """The same global batch split over 2 gloo ranks (1 micro-batch each) gives the same losses:
    to 1e-4 in fp32; within bf16 rounding under autocast (where the CPU has it), which catches a
    wrong gradient (a stale autocast cast under FSDP2 once gave 5e-2)."""
    one_process, bf16 = one_process
    tolerance = 3e-3 if bf16 else 1e-4
    cfg = config(corpus, tmp_path / "out", max_steps=4, eval_every=2, checkpoint_every=4, fsdp=fsdp, threads=1,
                 bf16=bf16)
    path = tmp_path / "train.json"
    path.write_text(json.dumps({k: v for k, v in vars(cfg).items()}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "blockdiff.cli", "train", str(path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in ("train", "val"):
        ours, ref = losses(tmp_path / "out", kind), losses(one_process, kind)
        assert len(ours) == len(ref) > 0
        assert max(abs(a - b) for a, b in zip(ours, ref)) < tolerance, (ours, ref)
    a = blockdiff.load_model(tmp_path / "out" / "checkpoint")
    b = blockdiff.load_model(one_process / "checkpoint")
    diff = max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert diff < (1e-4 if not bf16 else 4 * 3e-3)   # bf16: Adam may flip a tiny update (lr 3e-3, 4 steps)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_resume_rejects_a_different_model(corpus, tmp_path):
    train(config(corpus, tmp_path, max_steps=1))
    with pytest.raises(ConfigError, match="differs"):
        train(config(corpus, tmp_path, max_steps=2, model={**MODEL, "hidden_size": 48}), resume=True)


def test_init_from_starts_diffusion_from_ar_weights(corpus, tmp_path):
    """AR-initialised diffusion: the new run's first weights are the AR run's, at another canvas length;
    a model of another shape is refused."""
    train(config(corpus, tmp_path / "ar", objective="ar", max_steps=4))
    ar = blockdiff.load_model(tmp_path / "ar" / "checkpoint")
    adapted = config(corpus, tmp_path / "dd", max_steps=1, lr=1e-12, min_lr=0.0, weight_decay=0.0,
                     init_from=str(tmp_path / "ar" / "checkpoint"), model={**MODEL, "canvas_length": 4})
    train(adapted)
    model = blockdiff.load_model(tmp_path / "dd" / "checkpoint")
    assert model.config.canvas_length == 4
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ar.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ConfigError, match="init_from"):
        train(config(corpus, tmp_path / "bad", max_steps=1, init_from=str(tmp_path / "ar" / "checkpoint"),
                     model={**MODEL, "hidden_size": 48}))
    ar.to(torch.bfloat16).save_pretrained(tmp_path / "ar_bf16")        # stored as an export stores it
    train(config(corpus, tmp_path / "from_bf16", max_steps=1, init_from=str(tmp_path / "ar_bf16"),
                 model={**MODEL, "canvas_length": 4}))


def test_sigterm_checkpoints_and_the_run_resumes(corpus, tmp_path):
    """`kill PID` on a lone process saves where it stopped; --resume picks it up from there."""
    cfg = config(corpus, tmp_path / "out", max_steps=100_000, checkpoint_every=100_000, eval_every=100_000)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(vars(cfg)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "blockdiff.cli", "train", str(path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "out" / "log.jsonl"
    deadline = time.monotonic() + 60
    while not (log.is_file() and log.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.terminate()
    assert proc.wait(timeout=60) == 130
    step = json.loads((tmp_path / "out" / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert step >= 3
    result = train(TrainConfig.from_dict({**vars(cfg), "max_steps": step + 2}), resume=True)
    assert result.step == step + 2


def test_export_writes_a_loadable_model_with_card(corpus, tmp_path):
    from blockdiff.random_model import byte_tokenizer
    from blockdiff.train.export import export_run

    out = tmp_path / "run"
    # a vocabulary big enough for the byte tokenizer's ids; the corpus uses only the first 64
    train(config(corpus, out, max_steps=10, model={**MODEL, "vocab_size": 261}), resume=False)
    ckpt = out / "checkpoint"
    if not (ckpt / "tokenizer.json").exists():               # the synthetic corpus has no tokenizer
        byte_tokenizer().save(str(ckpt / "tokenizer.json"))
        (ckpt / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "bos_token": "<bos>"}))
    evaluation = {"samples": 4, "max_tokens": 8, "steps": 48, "judge_ppl_real": 39.5, "judge_ppl_diffusion": 812.25,
                  "distinct3_real": 0.99, "distinct3_diffusion": 0.5, "short_diffusion": 1,
                  "diffusion_tok_s": 150.0, "judge_ppl_ar": 120.0, "ar_tok_s": 60.0}
    gen = tmp_path / "generation_config.json"
    gen.write_text(json.dumps({"max_denoising_steps": 7}))
    dest = export_run(out, tmp_path / "model", samples=2, evaluation=evaluation, generation_config=gen)
    model = blockdiff.load_model(dest)
    assert model.dtype == torch.bfloat16
    card = (dest / "README.md").read_text()
    assert "optimizer steps: 10" in card and "validation loss at step 10" in card
    assert card.count("**") >= 4                               # two bold sample prompts
    assert "| this model, shipped defaults (<= 48 steps per canvas) | 812.250 | 0.500 | 1 | 150.000 |" in card
    assert "| real held-out text | 39.500 | 0.990 | n/a | n/a |" in card
    assert json.loads((dest / "generation_config.json").read_text()) == {"max_denoising_steps": 7}
    assert '"max_denoising_steps": 7' in card and '"max_steps": 10' in card       # sampler defaults, train config
    assert f"blockdiff export {out} DEST" in card


def test_card_recipe_trains_the_runs_it_starts_from():
    """A fine-tune of a distilled run names, once each, the runs that write its initial weights and teacher."""
    from blockdiff.config import ModelConfig
    from blockdiff.train.model_card import CardFacts, model_card

    tc = {"out_dir": "runs/default_kd", "data_dir": "data/distill", "init_from": "runs/default/checkpoint"}
    distill = {"teacher": "runs/default/checkpoint", "prompt_tokens": 32, "new_tokens": 224, "temperature": 0.6,
               "batch": 32, "seed": 0, "corpus_dir": "data/corpus"}
    card = model_card(CardFacts(params=1, config=ModelConfig(**MODEL), dtype="bfloat16", run_dir="runs/default_kd",
                                train_config=tc, train={}, val={}, throughput=None, manifest=None, distill=distill))
    recipe = card.split("```sh")[1].split("```")[0]
    assert recipe.count("blockdiff train configs/default.json    # writes runs/default/checkpoint") == 1
    assert recipe.index("configs/default.json") < recipe.index("blockdiff distill --teacher runs/default/checkpoint")
    other = model_card(CardFacts(params=1, config=ModelConfig(**MODEL), dtype="bfloat16", run_dir="r",
                                 train_config={"init_from": "/x/y"}, train={}, val={}, throughput=None,
                                 manifest=None, distill=None))
    assert "# /x/y: the starting weights" in other and "configs/default_ar.json" not in other
