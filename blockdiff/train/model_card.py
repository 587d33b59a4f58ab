"""The model card (README.md) of an exported model, written from facts only.

Contract: `model_card(CardFacts)` returns Markdown with, in order: architecture; data and licenses
(the corpus manifest); the commands that reproduce the model from a clean checkout and the exact
training config; training tokens, compute and validation losses (the run's log); the sampler defaults
the model ships with (its generation_config.json); the `blockdiff eval` table (real text, block
diffusion at the shipped defaults and at fewer steps, the AR baseline: judge perplexity, distinct
word 3-grams, empty or one-symbol answers, tok/s); samples. Every number comes from a file; a fact
that is missing is left out or shown as "n/a", never guessed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class CardFacts:
    params: int
    config: object                      # the model's ModelConfig
    dtype: str
    run_dir: str
    train_config: dict                  # the run's TrainConfig, as saved in trainer_state.json
    train: dict                         # the last training log record
    val: dict                           # the last validation log record
    throughput: float | None            # median logged training tok/s
    manifest: dict | None               # the corpus manifest (sources, licenses, bytes)
    distill: dict | None                # the distillation settings, when the data was distilled
    generation: dict = field(default_factory=dict)      # the shipped generation_config.json
    evaluation: dict | None = None      # `blockdiff eval`'s JSON
    samples: list[tuple[str, str]] = field(default_factory=list)
    sample_tokens: int = 64


def model_card(f: CardFacts) -> str:
    cfg = f.config
    lines = [f"# blockdiff default model ({f.params / 1e6:.1f}M parameters, {f.dtype})", "",
             "A small DiffusionGemma-architecture block-diffusion language model trained by the blockdiff project "
             "on public-domain and permissively licensed text" + (
                 f", starting from the weights of {f.train_config['init_from']} (see Reproduce)"
                 if f.train_config.get("init_from") else " from scratch")
             + (", on text written by an AR teacher from prompts of that text (sequence-level distillation)"
                if f.distill else "") + ".", "",
             "## Architecture", "",
             f"vocab {cfg.vocab_size} (byte-level BPE), hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers "
             f"({', '.join(cfg.layer_types)}), {cfg.num_attention_heads} heads, {cfg.num_experts} experts top-"
             f"{cfg.top_k_experts}, canvas {cfg.canvas_length}, sliding window {cfg.sliding_window}.", ""]
    lines += _data(f.manifest) + _recipe(f) + _training(f) + _sampler(f.generation)
    if f.evaluation:
        lines += _evaluation(f.evaluation)
    lines += [f"## Samples ({f.sample_tokens} tokens, shipped sampler defaults, seeds 0..{max(len(f.samples) - 1, 0)})",
              ""]
    lines += [line for prompt, text in f.samples for line in (f"**{prompt}**{text}", "")]
    lines += ["## License", "", "Weights: Apache-2.0, like the blockdiff code. Training texts: see the data table."]
    return "\n".join(lines) + "\n"


def _data(manifest: dict | None) -> list[str]:
    if not manifest:
        return []
    lines = ["## Data and licenses", "", "| source | license | obtained | train bytes |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['license']} | {s['obtained']} | {s['train_bytes']:,} |" for s in manifest["sources"]]
    return lines + [""]


def _recipe(f: CardFacts) -> list[str]:
    tc, data_dir = f.train_config, f.train_config.get("data_dir", "data/corpus")
    corpus = f.distill.get("corpus_dir", "data/corpus") if f.distill else data_dir
    steps = [f"blockdiff data --out {corpus} --install"]
    parents = [tc.get("init_from"), (f.distill or {}).get("teacher")]
    for parent in dict.fromkeys(p for p in parents if p):          # the runs this one starts from, once each
        steps.append(_parent_step(parent))
    if f.distill:
        d = f.distill
        steps.append(f"blockdiff distill --teacher {d['teacher']} --corpus {corpus} --out {data_dir} --tokens "
                     f"{d.get('tokens', 'TOKENS')} --prompt-tokens {d['prompt_tokens']} --new-tokens {d['new_tokens']} --temperature "
                     f"{d['temperature']} --batch {d['batch']} --seed {d['seed']}")
    ev = f.evaluation or {}
    ship = " --generation-config generation_config.json" if f.generation else ""
    steps += ["blockdiff train train.json                    # the config below; --resume continues",
              f"blockdiff export {f.run_dir} DEST{ship}",
              f"blockdiff eval --model DEST --samples {ev.get('samples', 16)} --max-tokens {ev.get('max_tokens', 64)}"
              " [--ar-model AR_DIR] > eval.json",
              f"blockdiff export {f.run_dir} DEST{ship} --eval eval.json    # the card with the eval table"]
    shown = {k: v for k, v in tc.items() if v is not None}
    return (["## Reproduce (from a clean checkout, `pip install -e .`)", "", "```sh", *steps, "```", "",
             "`train.json`, the run's training config:", "", "```json", json.dumps(shown, indent=1), "```", ""])


def _parent_step(path: str) -> str:
    """The command that writes `path`, a run this one starts from: `runs/NAME/checkpoint` is written by
    `configs/NAME.json` (the repository's convention); any other path is named as given."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[-3] == "runs" and parts[-1] == "checkpoint":
        return f"blockdiff train configs/{parts[-2]}.json    # writes {path}"
    return f"# {path}: the starting weights, made beforehand"


def _training(f: CardFacts) -> list[str]:
    tokens, steps = f.train.get("tokens"), f.train.get("step")
    lines = ["## Training", "",
             f"- optimizer steps: {steps if steps is not None else 'n/a'} of {f.train_config.get('max_steps', 'n/a')}",
             f"- training tokens (clean): {tokens if tokens is not None else 'n/a'}",
             f"- objective: {f.train_config.get('objective', 'n/a')}"
             + (f", initialised from {f.train_config['init_from']}" if f.train_config.get("init_from") else "")]
    if tokens:
        hours = (f"{tokens / f.throughput / 3600:.2f} h at the median logged {f.throughput:.0f} tok/s; "
                 if f.throughput else "")
        lines.append(f"- compute: {hours}about {6 * f.params * tokens:.2e} FLOPs (6 x parameters x tokens)")
    lines += [f"- last training loss: {_fmt(f.train.get('loss'))} (decoder {_fmt(f.train.get('decoder'))}, "
              f"encoder {_fmt(f.train.get('encoder'))})",
              f"- validation loss at step {f.val.get('step', 'n/a')}: {_fmt(f.val.get('val_loss'))} (decoder "
              f"{_fmt(f.val.get('val_decoder'))}, encoder {_fmt(f.val.get('val_encoder'))})", ""]
    return lines


def _sampler(generation: dict) -> list[str]:
    if not generation:
        return ["## Sampler defaults", "", "No generation_config.json: the engine's built-in defaults apply.", ""]
    return ["## Sampler defaults (generation_config.json)", "", "```json", json.dumps(generation, indent=1), "```", ""]


def _evaluation(ev: dict) -> list[str]:
    """The `blockdiff eval` JSON as a table (lower perplexity is more natural text; prose has ~0.99
    distinct 3-grams)."""
    rows = [("real held-out text", "real", None),
            (f"this model, shipped defaults (<= {ev.get('steps')} steps per canvas)", "diffusion", "diffusion_tok_s"),
            (f"this model, <= {ev.get('fast_steps')} steps per canvas", "diffusion_fast", "diffusion_tok_s_fast"),
            (f"{_ar_name(ev)}, AR decoding (temperature {ev.get('ar_temperature')})", "ar", "ar_tok_s")]
    lines = ["## Evaluation (`blockdiff eval`)", "",
             f"Judge: SmolLM2-135M perplexity of {ev.get('samples')} continuations of {ev.get('max_tokens')} tokens "
             "after held-out prompts; distinct 3-grams: distinct word 3-grams / all word 3-grams of the "
             "continuations; short: continuations that are empty or one symbol.", "",
             "| text | judge perplexity | distinct 3-grams | short | generation tok/s (batch "
             f"{ev.get('samples')}, CPU) |", "|---|---|---|---|---|"]
    for name, key, speed in rows:
        if ev.get(f"judge_ppl_{key}") is not None:
            lines.append(f"| {name} | {_fmt(ev[f'judge_ppl_{key}'])} | {_fmt(ev.get(f'distinct3_{key}'))} | "
                         f"{ev.get(f'short_{key}', 'n/a')} | {_fmt(ev.get(speed)) if speed else 'n/a'} |")
    return lines + [""]


def _ar_name(ev: dict) -> str:
    """The AR row's model: this model's own encoder (through the tied head), or another model."""
    same = ev.get("ar_model") is not None and ev.get("ar_model") == ev.get("model")
    return "this model's encoder" if same else f"AR baseline {ev.get('ar_model', '')}".rstrip()


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"
