"""A checkpoint's `generation_config.json`: the defaults of every request, and its stop and pad ids.

Contract: `read_generation_config(dir)` returns a `GenerationDefaults`, empty when the directory has
no such file; a malformed file raises `ConfigError` naming the file and the field. Mapping (the
fields of transformers' `DiffusionGemmaGenerationConfig`):
- `max_denoising_steps`, `t_min`, `t_max`, `stability_threshold`, `confidence_threshold` -> the
  knobs of the same name; `sampler_config` (an `EntropyBoundSamplerConfig`) -> `entropy_bound`;
- `temperature`, `top_k`, `top_p` (the usual transformers fields) -> the knobs of the same name:
  temperature multiplies the t_min..t_max schedule (0 = greedy);
- `min_new_tokens` -> `min_tokens`: end-of-sequence tokens are barred before that many new tokens;
- `max_new_tokens` -> the `max_tokens` of a request that sets none. It is a default, never a cap:
  a request that asks for more gets more (up to the context length). `max_length` (prompt plus new
  tokens) is not used: the engine's `max_model_len` bounds the total;
- `eos_token_id` (an id or a list, the release has [1, 106, 50]) -> ids that end a request, besides
  config.json's and the tokenizer's; `pad_token_id`, `bos_token_id` are kept for callers that pad.
- Fields that change nothing here (`return_dict_in_generate`, cache and compile settings, metadata)
  are ignored; any other field is an error, as in transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, read_json_object
from .diffusion.params import check_int
from .engine.request import SamplingParams

FILE = "generation_config.json"
KNOBS = ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold", "temperature",
         "top_k", "top_p")
IGNORED = ("return_dict_in_generate", "cache_implementation", "cache_config", "disable_compile", "max_length",
           "transformers_version", "_from_model_config", "_commit_hash")
SAMPLER = "EntropyBoundSamplerConfig"


@dataclass(frozen=True)
class GenerationDefaults:
    params: SamplingParams = field(default_factory=SamplingParams)   # knobs the file sets; the rest unset
    max_new_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None


def read_generation_config(path: str | Path) -> GenerationDefaults:
    file = Path(path) / FILE
    if not file.is_file():
        return GenerationDefaults()
    data = read_json_object(file, FILE)
    try:
        return _parse(data)
    except ValueError as err:
        raise ConfigError(f"{file}: {err}") from None


def _parse(data: dict) -> GenerationDefaults:
    known = set(KNOBS) | set(IGNORED) | {"sampler_config", "max_new_tokens", "min_new_tokens", "eos_token_id",
                                         "pad_token_id", "bos_token_id"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unsupported field(s) {', '.join(unknown)}")
    knobs = {k: data[k] for k in KNOBS if data.get(k) is not None}
    sampler = data.get("sampler_config")
    if sampler is not None:
        if not isinstance(sampler, dict) or sampler.get("_cls_name", SAMPLER) != SAMPLER:
            raise ValueError(f"sampler_config must be an {SAMPLER}, got {sampler!r}")
        if sampler.get("entropy_bound") is not None:
            knobs["entropy_bound"] = sampler["entropy_bound"]
    if data.get("min_new_tokens") is not None:
        knobs["min_tokens"] = data["min_new_tokens"]          # validated by SamplingParams
    ids = {}
    for name in ("max_new_tokens", "pad_token_id", "bos_token_id"):
        if data.get(name) is not None:
            check_int(data[name], name, 1 if name == "max_new_tokens" else 0)
            ids[name] = data[name]
    eos = data.get("eos_token_id")
    eos = () if eos is None else (eos,) if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if not isinstance(eos, (list, tuple)):
        raise ValueError(f"eos_token_id must be an id or a list of ids, got {eos!r}")
    for i in eos:
        check_int(i, "eos_token_id", 0)
    return GenerationDefaults(SamplingParams(**knobs), eos_token_ids=tuple(eos), **ids)
