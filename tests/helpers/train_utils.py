"""Tiny training configs shared by the trainer, resume, DDP and CLI tests (digits at 16x16, resnet10_mini)."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def tiny_config(strategy: str = "pgd_at", moe: bool | None = None, **train: Any) -> dict[str, Any]:
    """A config dict that trains for a few seconds on 2 CPU cores.

    Args:
        strategy: ``train.strategy``.
        moe: MoE model (E=2, r=0.5, top-1, model-level router); default: True for moe_at/advmoe.
        **train: extra ``train`` keys.
    """
    if moe is None:
        moe = strategy in ("moe_at", "advmoe")
    model = {
        "name": "resnet10_mini",
        "num_experts": 2 if moe else None,
        "ratio": 0.5 if moe else 1.0,
        "backend": "reference",
    }
    cfg = {
        "seed": 7,
        "device": "cpu",
        "model": model,
        "data": {
            "name": "digits",
            "kwargs": {"size": 16, "channels": 3},
            "crop_padding": 2,
            "flip": True,
            "max_train_samples": 64,
        },
        "train": {
            "strategy": strategy,
            "epochs": 2,
            "batch_size": 16,
            "eval_samples": 16,
            "progress": False,
            "attack": {"steps": 1},
            "eval_attack": {"steps": 1},
            "min_free_mb": 1,
            "log_every_steps": 1,
            "optimizer": {"lr": 0.05},
            "router_optimizer": {"lr": 0.05},
        },
    }
    cfg["train"].update(copy.deepcopy(train))
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    """Write ``cfg`` as YAML to ``path`` and return it."""
    path.write_text(yaml.safe_dump(cfg))
    return path


def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m advmoe`` subprocesses: the repo on the path, 1 thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


PYTHON = sys.executable
