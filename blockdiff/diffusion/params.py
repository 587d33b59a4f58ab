"""DiffusionParams: the knobs of the denoising loop, validated when built.

Defaults are the released generation config (48 steps, temperatures 0.8 -> 0.4, entropy bound 0.1,
stop when stable for 1 step and mean entropy < 0.005). Validation mirrors transformers' rules and
raises `ValueError` naming the field.
- `temperature` scales the whole t_min..t_max schedule (1.0 = the reference); 0 means greedy: the
  sampled token is the argmax, while acceptance and self-conditioning still use the schedule.
- `fixed_steps` disables early stopping: every canvas runs `max_denoising_steps` steps.
"""
from __future__ import annotations

from dataclasses import dataclass


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
        _int(self, "max_denoising_steps", minimum=1)
        _int(self, "stability_threshold", minimum=0)
        for name in ("t_min", "t_max", "temperature"):
            _number(self, name, minimum=0.0, inclusive=True)
        if not self.t_max > self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be greater than t_min ({self.t_min})")
        _number(self, "entropy_bound", minimum=0.0, inclusive=False)
        _number(self, "confidence_threshold", minimum=0.0, inclusive=False)
        if not isinstance(self.fixed_steps, bool):
            raise ValueError(f"fixed_steps must be a bool, got {self.fixed_steps!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _int(obj, name: str, minimum: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _number(obj, name: str, minimum: float, inclusive: bool) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {minimum}, got {value!r}")
