"""Saving and loading deployed models: a plain dict of tensors and strings, loadable with
``torch.load(weights_only=True)``.

File layout: ``{"format": "advmoe-deployed", "version": 1, "config": <create_model arguments>,
"deploy_mode": "pathway" | "grouped" | "layer" | "dense", "router_folded": bool, "state_dict": {...}}``.
Loading rebuilds
the source architecture with ``create_model(**config)``, converts it with ``to_sparse`` in the same mode
(which fixes the deployed structure) and loads the saved weights into it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "advmoe-deployed"
VERSION = 1


def deployed_state(model: nn.Module) -> dict[str, Any]:
    """The dict ``save_deployed`` writes for a model returned by ``to_sparse``."""
    mode = getattr(model, "deploy_mode", None)
    config = getattr(model, "config", None)
    if mode is None or not config:
        raise ValueError(
            "save_deployed needs a model returned by advmoe.deploy.to_sparse from a zoo model (with .config); "
            f"got a {type(model).__name__} without deploy_mode/config"
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    folded = bool(getattr(model, "router_folded", False))
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": dict(config),
        "deploy_mode": mode,
        "router_folded": folded,
        "state_dict": state,
    }


def save_deployed(model: nn.Module, path: str | Path) -> Path:
    """Writes a deployed model atomically (see the module docstring for the layout).

    Args:
        model: a model returned by ``to_sparse``.
        path: the file to write (parent folders are created).

    Returns:
        The path written.
    """
    from advmoe.checkpoint import save_checkpoint

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(deployed_state(model), path)
    return path


def load_deployed(path_or_dict: str | Path | dict, map_location: str | torch.device = "cpu") -> nn.Module:
    """Loads a model saved by ``save_deployed`` (never unpickles code: ``weights_only=True``).

    Args:
        path_or_dict: the file, or the dict it holds.
        map_location: device for the tensors.

    Returns:
        The deployed model in eval mode.

    Raises:
        ValueError: the file is not a deployed advmoe model, or its version is newer than this library.
    """
    from advmoe.deploy.to_sparse import to_sparse
    from advmoe.models import create_model

    if isinstance(path_or_dict, dict):
        blob = path_or_dict
    else:
        from advmoe.checkpoint import load_checkpoint

        blob = load_checkpoint(path_or_dict, map_location=map_location)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(
            f"{path_or_dict if not isinstance(path_or_dict, dict) else 'the dict'} is not a deployed advmoe model "
            f"(no format={FORMAT!r}); convert a training checkpoint with `advmoe convert` first"
        )
    if int(blob.get("version", 0)) > VERSION:
        raise ValueError(f"deployed model version {blob['version']} is newer than this library's ({VERSION})")
    model = create_model(**blob["config"]).eval()
    mode = blob["deploy_mode"] if blob["deploy_mode"] != "dense" else "layer"
    deployed = to_sparse(model, mode=mode, fold_router=bool(blob.get("router_folded", False)))
    deployed.load_state_dict(blob["state_dict"], strict=True)
    return deployed.to(map_location).eval()
