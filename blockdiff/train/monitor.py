"""Run records: the JSONL log (`out_dir/log.jsonl`) and the loss-curve PNG (`out_dir/loss.png`).

Contract: one JSON object per line; training records have `"kind": "train"`, validation records
`"kind": "val"`, both with `step`. On resume, records past the checkpoint's step (written after the
last save by a run that then died) are dropped, so the log reads as one uninterrupted run. The plot
needs matplotlib; without it `plot` returns False and nothing is drawn.
"""
from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Keep only the records up to `step` (resume) or none (`step` 0: a fresh run)."""
        kept = [r for r in self.read() if r["step"] <= step] if step else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot(records: list[dict], path: str | Path, title: str = "") -> bool:
    """Train loss (and its parts) and validation loss against step, log-scale y."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, style in (("loss", "-"), ("decoder", ":"), ("encoder", "--")):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=f"train {key}", alpha=0.8)
    for key in ("val_loss", "val_decoder", "val_encoder"):
        points = [(r["step"], r[key]) for r in val if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "o-", label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
