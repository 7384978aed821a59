"""Import of checkpoints trained with the public research code (OPTML-Group/Robust-MoE-CNN).

Its checkpoints are ``{"state_dict": model.state_dict(), "router": router.state_dict(), "epoch": ...}``.
Because its router module is attached to the model AND to every ``MoEConv``, the state dict holds the
router once at ``router.*`` and again under every MoE layer (``layer1.0.conv1.router.*``). Everything
else maps one to one onto our modules: MoEConv weights are (E*w, C_in, kh, kw) in both, BatchNorm is
shared by the experts of a layer, and module names match. Its routing is top-1 argmax of the router's
scores, with a straight-through gate: exactly ``create_model(..., top_k=1, router="research")``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from advmoe.models import create_model, list_models

# Architectures whose research forward applies ``model.normalize`` (VGG and DenseNet never do).
_NORMALIZING = ("resnet", "wrn")


def _load(path_or_dict) -> Mapping:
    if isinstance(path_or_dict, Mapping):
        return path_or_dict
    if not isinstance(path_or_dict, (str, Path)):
        raise TypeError(f"path_or_dict must be a path or a checkpoint dict, got {type(path_or_dict).__name__}")
    from advmoe.checkpoint import load_checkpoint

    return load_checkpoint(path_or_dict)


def _our_arch(arch: str) -> str:
    name = arch[: -len("_moe")] if arch.endswith("_moe") else arch[: -len("_ori")] if arch.endswith("_ori") else arch
    if name not in list_models():
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(list_models())} (optionally with _moe/_ori)")
    return name


def convert_research_state_dict(state_dict: Mapping[str, torch.Tensor], router_state=None, keep_normalize=True):
    """Maps a research-code state dict onto our module names.

    Drops the per-layer router copies (after checking they equal the model-level one), strips a
    DataParallel ``module.`` prefix, and takes the router from ``router_state`` when the model state
    dict has none.

    Args:
        state_dict: the checkpoint's ``state_dict``.
        router_state: the checkpoint's ``router`` state dict, or None.
        keep_normalize: keep ``normalize.mean/std`` (False for architectures whose research forward
            ignores them).

    Returns:
        (our state dict, normalize (mean, std) lists or None).
    """
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    copies: dict[str, list[torch.Tensor]] = {}
    for key, value in state.items():
        if ".router." in key:
            copies.setdefault(key.split(".router.", 1)[1], []).append(value)
        elif key.startswith("normalize."):
            if keep_normalize:
                out[key] = value
        else:
            out[key] = value
    if router_state is not None and not any(k.startswith("router.") for k in out):
        out.update({f"router.{k}": v for k, v in router_state.items()})
    for key, values in copies.items():
        main = out.get(f"router.{key}")
        if main is None:
            out[f"router.{key}"] = main = values[0]
        if any(v.shape != main.shape or not torch.equal(v, main) for v in values):
            warnings.warn(
                f"per-layer router copies of {key!r} differ from the model router; using router.{key}", stacklevel=3
            )
    normalize = None
    if "normalize.mean" in out and "normalize.std" in out:
        normalize = (out["normalize.mean"].tolist(), out["normalize.std"].tolist())
    return out, normalize


def load_research_checkpoint(
    path_or_dict, arch: str, num_experts: int | None, ratio: float, num_classes: int, backend: str = "auto"
) -> nn.Module:
    """Builds our model from a research-code checkpoint, in eval mode.

    Gives the same logits and the same expert choices as the research model on the same input.

    Args:
        path_or_dict: a ``.pth`` path (loaded with ``weights_only=True``) or the loaded dict
            ``{"state_dict", "router", "epoch", ...}`` (a bare state dict is accepted too).
        arch: our model name or the research name (``resnet18_cifar_moe``, ``wrn_28_10_cifar_ori``...).
        num_experts: E of the checkpoint; None or 1 for the research dense (``_ori``) models.
        ratio: the width ratio it was trained with.
        num_classes: classifier outputs.
        backend: ``sparse_moe_conv2d`` backend of the MoE layers.

    Returns:
        The model in eval mode; ``model.config`` rebuilds it with ``create_model``.

    Raises:
        ValueError: unknown arch, or a state dict that does not fit (the message lists the keys).
    """
    checkpoint = _load(path_or_dict)
    state_dict = checkpoint.get("state_dict", checkpoint)
    name = _our_arch(arch)
    normalizing = name.startswith(_NORMALIZING)
    state, normalize = convert_research_state_dict(state_dict, checkpoint.get("router"), keep_normalize=normalizing)
    moe = num_experts is not None and num_experts > 1
    extra = {"preact_projection": False} if (moe and name.startswith("wrn")) else {}
    in_channels = 3
    model = create_model(
        name,
        num_classes=num_classes,
        num_experts=num_experts,
        ratio=ratio,
        top_k=1,
        router="research",
        in_channels=in_channels,
        normalize=normalize,
        backend=backend,
        router_norm=False,
        gate_score="logits",
        **extra,
    )
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs ours {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"checkpoint does not fit {name} (num_experts={num_experts}, ratio={ratio}, num_classes={num_classes}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {mismatched[:5]}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()
