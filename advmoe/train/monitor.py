"""What a training run reports: per-epoch SA/RA, JSON-lines and CSV logs, and the training-curve plot.

Files written by rank 0 in the run directory:

- ``log.jsonl``: one JSON object per line; ``{"event": "step", ...}`` every ``train.log_every_steps``
  steps, ``{"event": "epoch", ...}`` after each evaluated epoch, ``{"event": "start" | "resume" | "stop" |
  "error", ...}`` for the run's life cycle.
- ``epochs.csv``: the epoch records as a table (rewritten from the run history each time, so a resumed
  run has no duplicate rows).
- ``curves.png``: training loss and training-attack accuracy, and SA/RA of the test subset, per epoch.
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from advmoe.train.config import AttackConfig
from advmoe.train.distributed import DistInfo, all_reduce_sum
from advmoe.train.forward import model_mode

__all__ = ["RunLog", "evaluate_sa_ra"]


def evaluate_sa_ra(
    model: nn.Module, loader: DataLoader, attack: AttackConfig, device: torch.device, dist: DistInfo | None = None
) -> dict[str, float]:
    """Clean accuracy (SA) and PGD robust accuracy (RA) on the batches of ``loader``, in eval mode.

    A quick per-epoch monitor (PGD-CE with ``attack``), not the full evaluation of ``advmoe.eval``.
    Under torchrun each rank evaluates its shard and the counts are summed.

    Args:
        model: the bare model.
        loader: batches of ((B, C, H, W) images in [0, 1], (B,) labels).
        attack: the PGD settings (``train.eval_attack``); ``steps=0`` skips the attack (RA = SA).
        device: where to run.
        dist: process-group information.

    Returns:
        ``{"sa": fraction, "ra": fraction, "n": samples}`` (fractions in [0, 1], as ``advmoe.eval``).
    """
    from advmoe import attacks

    counts = torch.zeros(3, dtype=torch.float64)
    with model_mode(model, False):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                clean_ok = model(x).argmax(1) == y
            if attack.steps > 0 and attack.eps > 0:
                x_adv = attacks.pgd(
                    model,
                    x,
                    y,
                    attack.eps,
                    attack.alpha,
                    attack.steps,
                    random_start=attack.random_start,
                    norm=attack.norm,
                )
                with torch.no_grad():
                    adv_ok = model(x_adv).argmax(1) == y
            else:
                adv_ok = clean_ok
            counts += torch.tensor([clean_ok.sum().item(), adv_ok.sum().item(), y.numel()], dtype=torch.float64)
    counts = all_reduce_sum(counts.to(device), dist or DistInfo()).cpu()
    n = counts[2].item()
    return {
        "sa": counts[0].item() / n if n else float("nan"),
        "ra": counts[1].item() / n if n else float("nan"),
        "n": int(n),
    }


class RunLog:
    """Writes the run's logs (only where ``enabled``, i.e. on rank 0).

    Args:
        out_dir: run directory.
        enabled: False on ranks other than 0 (every method is then a no-op).
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled

    def event(self, event: str, **fields: Any) -> None:
        """Append one ``{"event": event, "time": unix seconds, **fields}`` line to ``log.jsonl``."""
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def epochs(self, history: list[dict[str, Any]]) -> None:
        """Rewrite ``epochs.csv`` and ``curves.png`` from the list of epoch records."""
        if not self.enabled or not history:
            return
        keys = list(dict.fromkeys(k for rec in history for k in rec))
        tmp = self.out_dir / ".epochs.csv.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            for rec in history:
                writer.writerow({k: rec.get(k, "") for k in keys})
        tmp.replace(self.out_dir / "epochs.csv")
        self._plot(history)

    def _plot(self, history: list[dict[str, Any]]) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # a missing plotting library must not stop a training run
            if not getattr(self, "_warned", False):
                warnings.warn("matplotlib is not installed: curves.png is not written", stacklevel=2)
                self._warned = True
            return

        epochs = [rec["epoch"] for rec in history]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(epochs, [rec.get("train_loss", math.nan) for rec in history], marker="o", label="train loss")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        for key, label in (("sa", "SA (test)"), ("ra", "RA (test, PGD)"), ("train_adv_acc", "train adv. acc")):
            values = [rec.get(key) for rec in history]
            if any(v is not None for v in values):
                ax_acc.plot(epochs, [math.nan if v is None else 100 * v for v in values], marker="o", label=label)
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.legend()
        fig.tight_layout()
        tmp = self.out_dir / ".curves.png.tmp"
        fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        tmp.replace(self.out_dir / "curves.png")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
