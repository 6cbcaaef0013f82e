"""Pictures of what happens inside the models. Each function draws one picture to PNG or SVG
(the file's suffix decides) and returns the numbers it plotted, so tests can check them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .errors import ScrivenError  # noqa: E402


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg"):
        raise ScrivenError(f"output {out}: must end in .png or .svg")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def plot_training_curves(metrics: str | Path, out: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Training loss and validation loss against steps, from a run's metrics.jsonl."""
    path = Path(metrics)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ScrivenError(f"metrics log {path}: no such file")
    train, valid = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ScrivenError(f"metrics log {path}, line {number}: not JSON") from None
        if "loss" in record:
            train.append((record["step"], record["loss"]))
        if "val_loss" in record:
            valid.append((record["step"], record["val_loss"]))
    if not train and not valid:
        raise ScrivenError(f"metrics log {path}: no loss values to plot")
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss", lw=1.2)
    if valid:
        ax.plot(*zip(*valid), label="validation loss", marker="o", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out)
    return {"train": train, "valid": valid}
