"""DiffusionParams: the knobs of the denoising loop, their built-in defaults and their limits.

This module is the one source of both: `SamplingParams` extends `DiffusionParams`, the reference
sampler and the command line take their defaults from it, and the server's request schema takes
its bounds from the limits below, so every value the server accepts, the engine runs.

Defaults are the released generation config (48 steps, temperatures 0.8 -> 0.4, entropy bound 0.1,
stop when stable for 1 step and mean entropy < 0.005). Invalid values raise `ValueError` naming
the field.
- `temperature` scales the whole t_min..t_max schedule (1.0 = the reference); 0 means greedy: the
  sampled token is the argmax, while acceptance and self-conditioning still use the schedule.
- `fixed_steps` disables early stopping: every canvas runs `max_denoising_steps` steps.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_DENOISING_STEPS = 512          # per canvas: bounds the work one request can ask for
MAX_STABILITY = 4                  # argmax canvases the engine remembers per request
FLOAT32_MAX = 3.4028234663852886e38  # float knobs land in float32 tensors
INT64_MAX = 2**63 - 1              # integer knobs land in int64 tensors


@dataclass(frozen=True)
class DiffusionParams:
    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    confidence_threshold: float = 0.005
    stability_threshold: int = 1
    temperature: float = 1.0
    fixed_steps: bool = False

    def __post_init__(self) -> None:
        check_int(self.max_denoising_steps, "max_denoising_steps", 1, MAX_DENOISING_STEPS)
        check_int(self.stability_threshold, "stability_threshold", 0, MAX_STABILITY)
        for name in ("t_min", "t_max", "temperature"):
            check_number(getattr(self, name), name, 0.0, inclusive=True)
        if not self.t_max > self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be greater than t_min ({self.t_min})")
        check_number(self.entropy_bound, "entropy_bound", 0.0, inclusive=False)
        check_number(self.confidence_threshold, "confidence_threshold", 0.0, inclusive=False)
        check_bool(self.fixed_steps, "fixed_steps")

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
