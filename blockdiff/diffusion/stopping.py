"""Stable-and-confident early stopping of a canvas's denoising loop.

A row stops when (a) its argmax canvas equals each of the last `stability_threshold` argmax canvases
at every position (always true when the threshold is 0) and (b) the mean per-position entropy of its
processed logits is below `confidence_threshold`. The history starts filled with -1, so with the
default threshold of 1 a canvas can stop at its second step at the earliest. Call `reset()` at
every new canvas.
"""
from __future__ import annotations

import torch

from .acceptance import entropy


class StableAndConfident:
    def __init__(self, stability_threshold: int, confidence_threshold: float):
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self.history: torch.Tensor | None = None     # (S, B, C) previous argmax canvases

    def reset(self) -> None:
        self.history = None

    def __call__(self, argmax_canvas: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """argmax_canvas (B, C), processed logits (B, C, V) -> (B,) bool 'stop now'."""
        if self.stability_threshold == 0:
            stable = torch.ones(argmax_canvas.shape[0], dtype=torch.bool, device=argmax_canvas.device)
        else:
            if self.history is None:
                self.history = torch.full((self.stability_threshold, *argmax_canvas.shape), -1,
                                          dtype=argmax_canvas.dtype, device=argmax_canvas.device)
            stable = (self.history == argmax_canvas[None]).all(dim=-1).all(dim=0)
            self.history = torch.cat((self.history[1:], argmax_canvas[None]), dim=0)
        confident = entropy(logits).mean(dim=-1) < self.confidence_threshold
        return stable & confident
