"""`blockdiff bench --structured`: validity and cost of structured output, measured in one run.

(a) Validity: every schema of `bench_schemas.SUITE` (32), a few seeds each, asked for through the
    chat template of the embedded default model with its default denoising knobs. Reports the
    share of outputs that end in "stop", the share of those that parse and validate (jsonschema;
    the guarantee says 1.0), and the share of "length" outputs that are a valid prefix.
(b) Overhead: tok/s of batch-16 requests under a JSON schema against the same requests without
    one, on the small bench preset's random weights (vocabulary 8,192: the default model's
    tokenizer fits it), fixed steps, every request running to max_tokens (the schema asks for
    a longer array than fits), so both sides run the same canvases and steps.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .bench import build_checkpoint, prompts_for
from .bench_schemas import SUITE
from .engine.engine import LLM
from .engine.request import SamplingParams
from .hardware import auto_dtype

# many items, none long: a request under it always runs to max_tokens
LONG = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "tag": {"type": "string", "maxLength": 6}},
    "required": ["id", "tag"], "additionalProperties": False}}


def validity(model_dir: Path, seeds: int, max_tokens: int, guide: bool = True) -> dict:
    """Run the suite on the model in `model_dir`; figures as in the module docstring. `guide`: pin
    the grammar frontier between denoising steps (the engine's default) or only constrain the commit."""
    import jsonschema

    llm = LLM(model_dir, max_num_seqs=16, max_model_len=1024)
    llm.runner.guide_constraints = guide
    jobs = [(desc, schema, seed) for desc, schema in SUITE for seed in range(seeds)]
    prompts = [llm.inputs.chat([{"role": "user", "content": f"Give {desc} as JSON following this schema: "
                                                            f"{json.dumps(schema)}"}]) for desc, schema, _ in jobs]
    params = [SamplingParams(max_tokens=max_tokens, seed=seed, json_schema=schema) for _, schema, seed in jobs]
    start = time.perf_counter()
    requests = [llm.requests[llm.add_request(p, sp)] for p, sp in zip(prompts, params)]
    finals = {}
    while llm.has_unfinished():
        finals.update({o.request_id: o for o in llm.step() if o.finished})
    wall = time.perf_counter() - start
    outs = [finals[r.request_id] for r in requests]
    committed = sum(r.constraint.committed for r in requests)
    stops, valid, failures = 0, 0, []
    for (desc, schema, _), out in zip(jobs, outs):
        if out.finish_reason != "stop":
            continue
        stops += 1
        try:
            jsonschema.validate(json.loads(out.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            failures.append({"schema": desc, "text": out.text, "error": str(e)[:200]})
    return {"schemas": len(SUITE), "requests": len(jobs), "stop": stops, "stop_share": stops / len(jobs),
            "valid_stop": valid, "valid_share_of_stop": valid / stops if stops else float("nan"),
            "length": sum(o.finish_reason == "length" for o in outs), "failures": failures[:5],
            "tokens": sum(len(o.token_ids) for o in outs), "wall_s": wall,
            "repaired_share": sum(r.constraint.repaired for r in requests) / max(1, committed),
            "steps_per_canvas": sum(sum(o.stats.steps_per_canvas) for o in outs) /
            max(1, sum(len(o.stats.steps_per_canvas) for o in outs))}


def overhead(preset: str, root: Path, tokenizer_dir: Path, batch: int, steps: int, canvases: int,
             prompt_len: int, repeat: int) -> dict:
    """Constrained (frontier pinned, as by default) vs free tok/s at `batch`, fixed steps, every
    request running to max_tokens."""
    model = build_checkpoint(preset, root / preset, auto_dtype("cpu"), "cpu")
    c = model.config.canvas_length
    max_tokens = canvases * c
    llm = LLM(model, tokenizer=tokenizer_dir, max_num_seqs=batch, max_model_len=prompt_len + max_tokens + c)
    prompts = prompts_for(batch, prompt_len, model.config.vocab_size)
    common = dict(max_tokens=max_tokens, max_denoising_steps=steps, fixed_steps=True)
    free = [SamplingParams(seed=i, ignore_eos=True, **common) for i in range(batch)]
    constrained = [SamplingParams(seed=i, json_schema=LONG, **common) for i in range(batch)]
    llm.generate(prompts, [SamplingParams(seed=i, max_tokens=1, max_denoising_steps=2, fixed_steps=True,
                                          json_schema=LONG) for i in range(batch)])      # warm-up, grammar tables
    res = {"preset": preset, "batch": batch, "steps": steps, "canvas": c, "max_tokens": max_tokens}
    for name, params in (("free", free), ("constrained", constrained)):
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            best = min(best, time.perf_counter() - start)
        tokens = sum(len(o.token_ids) for o in outs)
        res[f"{name}_tok_s"] = tokens / best
        res[f"{name}_finish"] = sorted({o.finish_reason for o in outs})
        print(f"{name:>12} bs={batch}: {tokens / best:8.1f} tok/s ({tokens} tokens, {best:.2f} s)", file=sys.stderr,
              flush=True)
    res["constrained_vs_free"] = res["constrained_tok_s"] / res["free_tok_s"]
    return res
