"""DiffusionParams: the knobs of the denoising loop, their built-in defaults and their limits.

This module is the one source of both: `SamplingParams` extends `DiffusionParams`, the reference
sampler and the command line take their defaults from `BUILT_IN`, and the server's request schema
takes its bounds from the limits below, so every value the server accepts, the engine runs.

A knob left as None is unset: `with_defaults` fills it from a layer of defaults. The engine resolves
each request once, at admission, in the order request > server flags > the checkpoint's
generation_config.json > `BUILT_IN`. `BUILT_IN` equals the released generation config (48 steps,
temperatures 0.8 -> 0.4, entropy bound 0.1, stop when stable for 1 step and mean entropy < 0.005).
Invalid values raise `ValueError` naming the field, when set and again after resolution (the
cross-field rule t_max > t_min can only be checked once both are known).
- `temperature` scales the whole t_min..t_max schedule (1.0 = the reference); 0 means greedy: the
  sampled token is the argmax, while acceptance and self-conditioning still use the schedule.
- `fixed_steps` disables early stopping: every canvas runs `max_denoising_steps` steps.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TypeVar

MAX_DENOISING_STEPS = 512          # per canvas: bounds the work one request can ask for
MAX_STABILITY = 4                  # argmax canvases the engine remembers per request
MAX_LOGPROBS = 20                  # top alternatives per committed token (OpenAI's chat limit)
FLOAT32_MAX = 3.4028234663852886e38  # float knobs land in float32 tensors
INT64_MAX = 2**63 - 1              # integer knobs land in int64 tensors

P = TypeVar("P", bound="DiffusionParams")


@dataclass(frozen=True)
class DiffusionParams:
    max_denoising_steps: int | None = None
    t_min: float | None = None
    t_max: float | None = None
    entropy_bound: float | None = None
    confidence_threshold: float | None = None
    stability_threshold: int | None = None
    temperature: float | None = None
    fixed_steps: bool | None = None

    def __post_init__(self) -> None:
        checks = {
            "max_denoising_steps": lambda v, n: check_int(v, n, 1, MAX_DENOISING_STEPS),
            "stability_threshold": lambda v, n: check_int(v, n, 0, MAX_STABILITY),
            "t_min": lambda v, n: check_number(v, n, 0.0, inclusive=True),
            "t_max": lambda v, n: check_number(v, n, 0.0, inclusive=True),
            "temperature": lambda v, n: check_number(v, n, 0.0, inclusive=True),
            "entropy_bound": lambda v, n: check_number(v, n, 0.0, inclusive=False),
            "confidence_threshold": lambda v, n: check_number(v, n, 0.0, inclusive=False),
            "fixed_steps": check_bool,
        }
        for name, check in checks.items():
            if getattr(self, name) is not None:
                check(getattr(self, name), name)
        if self.t_min is not None and self.t_max is not None and not self.t_max > self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be greater than t_min ({self.t_min})")

    def with_defaults(self: P, defaults) -> P:
        """A copy whose unset (None) fields take `defaults`' value of the same name, where it has one.
        The copy is validated again, so a request's t_max below the defaults' t_min is an error here."""
        filled = {f.name: getattr(defaults, f.name) for f in fields(self)
                  if getattr(self, f.name) is None and getattr(defaults, f.name, None) is not None}
        return replace(self, **filled) if filled else self

    @property
    def unset(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is None]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_int(value, name: str, minimum: int, maximum: int = INT64_MAX) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")


def check_number(value, name: str, minimum: float, inclusive: bool, maximum: float = FLOAT32_MAX) -> None:
    """A finite real number in [minimum (or > minimum), maximum]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {minimum}, got {value!r}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {value!r}")


def check_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


# The built-in defaults: what a knob is when neither the request, the server nor the checkpoint sets it.
BUILT_IN = DiffusionParams(max_denoising_steps=48, t_min=0.4, t_max=0.8, entropy_bound=0.1,
                           confidence_threshold=0.005, stability_threshold=1, temperature=1.0, fixed_steps=False)
