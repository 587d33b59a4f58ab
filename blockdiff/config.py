"""ModelConfig: the DiffusionGemma text model's settings, read from and written to `config.json`.

Contract:
- `ModelConfig.from_dict(d)` accepts the Hugging Face layout (`model_type: "diffusion_gemma"` with a
  nested `text_config`) and also a bare text config (`model_type: "diffusion_gemma_text"`).
- `to_dict()` writes the Hugging Face layout back. Keys blockdiff does not model (`architectures`,
  `transformers_version`, ...) are kept in `extra` / `text_extra` / `VisionConfig.extra`, so a config
  that was read and written again round-trips.
- `vision_config` (a `VisionConfig`, the Gemma 4 vision tower) is None for a text-only model; such a
  model is written with a tiny placeholder tower config (see PLACEHOLDER_VISION).
- Per-layer attention shapes follow transformers' `per_layer_config`: sliding layers use the top
  level `head_dim` / `num_key_value_heads`, full layers their own (`global_head_dim`, default 512).
- Invalid or unsupported configs raise `ConfigError` with a message that names the field.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
REQUIRED = ("num_experts", "top_k_experts", "moe_intermediate_size")
VISION_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "patch_size", "pooling_kernel_size", "position_embedding_size")


class ConfigError(ValueError):
    """A config.json that blockdiff cannot use; the message names the field."""


def check_positive(obj, names, what: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{what} '{name}' must be a positive integer, got {value!r}")


@dataclass
class VisionConfig:
    """The Gemma 4 vision tower (`model_type "gemma4_vision"`); defaults are transformers' class defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "axial", "rope_theta": 100.0})
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    use_clipped_linears: bool = False
    standardize: bool = False
    extra: dict[str, Any] = field(default_factory=dict)    # unknown keys, kept for the round trip

    def __post_init__(self) -> None:
        check_positive(self, VISION_INTS, "vision_config field")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("vision_config 'num_attention_heads' is not a multiple of 'num_key_value_heads'")
        if self.head_dim % 4:
            raise ConfigError(f"vision_config 'head_dim' must be a multiple of 4 (2-D rotary), got {self.head_dim}")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"vision_config 'hidden_activation' {self.hidden_activation!r} is not supported")
        if (self.rope_parameters or {}).get("rope_type", "axial") != "axial":
            raise ConfigError("vision_config 'rope_parameters.rope_type' must be 'axial'")

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 100.0))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VisionConfig":
        data = dict(data)
        if data.pop("model_type", "gemma4_vision") != "gemma4_vision":
            raise ConfigError("vision_config must have model_type 'gemma4_vision'")
        known = {f.name for f in fields(cls)} - {"extra"}
        try:
            return cls(**{k: data.pop(k) for k in list(data) if k in known}, extra=data)
        except TypeError as err:
            raise ConfigError(f"bad vision_config in config.json: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        out = {"model_type": "gemma4_vision", **copy.deepcopy(self.extra)}
        out.update({f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "extra"})
        return out


# A negligible vision tower for checkpoints written by blockdiff without one: transformers builds a
# 167M-parameter default tower when `vision_config` is absent, so we name a tiny one instead.
PLACEHOLDER_VISION = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, head_dim=8, position_embedding_size=16, patch_size=4,
                                  pooling_kernel_size=2).to_dict()


@dataclass
class ModelConfig:
    """Text-model settings. Defaults are transformers' class defaults (not the 26B release)."""

    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    vocab_size: int = 262144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    layer_types: list[str] | None = None
    sliding_window: int = 512
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    rope_parameters: dict[str, dict[str, Any]] | None = None
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    bos_token_id: int = 2
    tie_word_embeddings: bool = True
    canvas_length: int = 256
    dtype: str = "float32"
    # top-level eos ids (the release lists [1, 106]); None means "use text eos_token_id"
    model_eos_token_id: int | list[int] | None = None
    vision_config: VisionConfig | None = None
    image_token_id: int = 258880      # soft-token placeholder; boi/eoi wrap each image's run of them
    boi_token_id: int = 255999
    eoi_token_id: int = 258882
    extra: dict[str, Any] = field(default_factory=dict)       # unknown top-level keys
    text_extra: dict[str, Any] = field(default_factory=dict)  # unknown text_config keys

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if self.layer_types and self.layer_types[-1] != FULL:
            # transformers forces the last layer to full attention; mirror it so both read one model
            warnings.warn("the last layer must use full_attention; forcing it", stacklevel=2)
            self.layer_types[-1] = FULL
        if self.rope_parameters is None:
            self.rope_parameters = copy.deepcopy(DEFAULT_ROPE)
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        self.validate()

    def validate(self) -> None:
        check_positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "head_dim", "global_head_dim",
                              "sliding_window", "num_experts", "top_k_experts", "moe_intermediate_size",
                              "canvas_length"), "config field")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"config field 'layer_types' has {len(self.layer_types)} entries, "
                              f"expected num_hidden_layers={self.num_hidden_layers}")
        for i, kind in enumerate(self.layer_types):
            if kind not in (SLIDING, FULL):
                raise ConfigError(f"config field 'layer_types[{i}]' must be '{SLIDING}' or '{FULL}', got {kind!r}")
            if self.num_attention_heads % self.layer_kv_heads(i):
                raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of the "
                                  f"{self.layer_kv_heads(i)} key/value heads of layer {i}")
        if self.top_k_experts > self.num_experts:
            raise ConfigError("config field 'top_k_experts' exceeds 'num_experts'")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"config field 'hidden_activation' {self.hidden_activation!r} is not supported")
        if self.text_extra.get("attention_bias"):
            raise ConfigError("config field 'attention_bias' = true is not supported")
        if self.text_extra.get("use_bidirectional_attention") == "all":
            raise ConfigError("config field 'use_bidirectional_attention' = 'all' is not supported")
        for kind in set(self.layer_types):
            rope = self.rope_parameters.get(kind)
            if rope is None or rope.get("rope_type", "default") not in ("default", "proportional"):
                raise ConfigError(f"config field 'rope_parameters.{kind}' is missing or has an unsupported rope_type")

    def check_image_tokens(self) -> None:
        """A model with a vision tower needs its image token ids inside the vocabulary."""
        for name in ("image_token_id", "boi_token_id", "eoi_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"config field '{name}' = {getattr(self, name)} is outside the vocabulary "
                                  f"(vocab_size={self.vocab_size})")

    # ---- per-layer shapes -------------------------------------------------------------------
    def layer_head_dim(self, i: int) -> int:
        return self.global_head_dim if self.layer_types[i] == FULL else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        if self.layer_types[i] == FULL and self.num_global_key_value_heads is not None:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    @property
    def bidirectional_images(self) -> bool:
        """Whether each image's soft tokens attend to each other inside the causal prompt."""
        return self.text_extra.get("use_bidirectional_attention") == "vision"

    @property
    def eos_ids(self) -> list[int]:
        """All end-of-sequence ids: the model-level list if given, else the text config's."""
        ids = self.model_eos_token_id if self.model_eos_token_id is not None else self.eos_token_id
        return [ids] if isinstance(ids, int) else list(ids)

    # ---- (de)serialisation ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = copy.deepcopy(data)
        model_type = data.get("model_type")
        if model_type == "diffusion_gemma":
            if not isinstance(data.get("text_config"), dict):
                raise ConfigError("config.json of model_type 'diffusion_gemma' has no 'text_config' object")
            text, top = data.pop("text_config"), data
        elif model_type == "diffusion_gemma_text":
            text, top = data, {}
        else:
            raise ConfigError(f"unsupported model_type {model_type!r}: blockdiff reads 'diffusion_gemma' checkpoints")
        missing = [k for k in REQUIRED if text.get(k) is None]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        try:
            kwargs = _text_kwargs(text)
        except (TypeError, ValueError, AttributeError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"bad text_config in config.json: {err}") from None
        kwargs["canvas_length"] = top.pop("canvas_length", 256)
        kwargs["dtype"] = str(top.pop("dtype", None) or top.pop("torch_dtype", None) or "float32")
        kwargs["model_eos_token_id"] = top.pop("eos_token_id", None)
        kwargs["vision_config"] = top.pop("vision_config", None)
        for name in ("image_token_id", "boi_token_id", "eoi_token_id"):
            if name in top:
                kwargs[name] = top.pop(name)
        top.pop("model_type", None)
        if "tie_word_embeddings" in top:
            kwargs["tie_word_embeddings"] = top.pop("tie_word_embeddings")
        if not kwargs.get("tie_word_embeddings", True):
            raise ConfigError("config field 'tie_word_embeddings' = false is not supported (encoder and decoder "
                              "share one set of weights)")
        try:
            return cls(**kwargs, extra=top)
        except TypeError as err:
            raise ConfigError(f"bad config.json: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        names = {f.name for f in fields(self)} - {"extra", "text_extra", "canvas_length", "dtype", "global_head_dim",
                                                   "num_global_key_value_heads", "model_eos_token_id",
                                                   "vision_config", "tie_word_embeddings", "image_token_id",
                                                   "boi_token_id", "eoi_token_id"}
        text = {"model_type": "diffusion_gemma_text", **self.text_extra}
        text.update({name: copy.deepcopy(getattr(self, name)) for name in sorted(names)})
        text["tie_word_embeddings"] = self.tie_word_embeddings
        text["per_layer_config"] = {
            str(i): {"head_dim": self.layer_head_dim(i), "num_key_value_heads": self.layer_kv_heads(i)}
            for i, kind in enumerate(self.layer_types) if kind == FULL
        }
        out = {"architectures": ["DiffusionGemmaForBlockDiffusion"], **copy.deepcopy(self.extra)}
        out.update({"model_type": "diffusion_gemma", "canvas_length": self.canvas_length, "dtype": self.dtype,
                    "tie_word_embeddings": self.tie_word_embeddings, "text_config": text,
                    "vision_config": self.vision_config.to_dict() if self.vision_config else copy.deepcopy(PLACEHOLDER_VISION),
                    "image_token_id": self.image_token_id, "boi_token_id": self.boi_token_id,
                    "eoi_token_id": self.eoi_token_id})
        if self.model_eos_token_id is not None:
            out["eos_token_id"] = self.model_eos_token_id
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json_object(path, "config.json"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from a file; FileNotFoundError / ConfigError name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _text_kwargs(text: dict[str, Any]) -> dict[str, Any]:
    """Map a text_config dict to ModelConfig kwargs; unknown keys go to `text_extra`."""
    text = dict(text)
    text.pop("model_type", None)
    per_layer = text.pop("per_layer_config", None) or {}
    known = {f.name for f in fields(ModelConfig)} - {"extra", "text_extra", "canvas_length", "dtype",
                                                     "model_eos_token_id", "vision_config", "image_token_id",
                                                     "boi_token_id", "eoi_token_id"}
    kwargs = {k: text.pop(k) for k in list(text) if k in known}
    layer_types = kwargs.get("layer_types")
    if layer_types is not None and len(layer_types) != kwargs.get("num_hidden_layers", len(layer_types)):
        layer_types = None     # validate() reports the length mismatch with a clearer message
    for idx, override in per_layer.items():
        idx = int(idx)
        if layer_types is not None and (idx >= len(layer_types) or layer_types[idx] != FULL):
            raise ConfigError(f"per_layer_config overrides layer {idx}, which is not a full-attention layer")
        if "head_dim" in override:
            kwargs["global_head_dim"] = override["head_dim"]
        if "num_key_value_heads" in override:
            kwargs["num_global_key_value_heads"] = override["num_key_value_heads"]
    kwargs["text_extra"] = text
    return kwargs
