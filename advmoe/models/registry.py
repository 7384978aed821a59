"""Model registry: ``create_model(name, ...)`` and ``list_models()``.

Each architecture registers small builders ``builder(spec, num_classes, in_channels, normalize,
**kwargs) -> RoutedModel``; MoE is switched on by ``num_experts``, never by a separate model file.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from advmoe.models.common import ModelSpec

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: registers ``fn`` under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by ``create_model``, sorted."""
    return sorted(_MODELS)


def create_model(
    name: str,
    num_classes: int = 10,
    num_experts: int | None = None,
    ratio: float = 1.0,
    top_k: int = 1,
    router: str = "research",
    in_channels: int = 3,
    normalize: tuple | None = None,
    backend: str = "auto",
    router_norm: bool = True,
    gate_score: str = "softmax",
    **kwargs,
) -> nn.Module:
    """Builds a dense or MoE model of the zoo. Inputs are images in [0, 1].

    Args:
        name: one of ``list_models()``.
        num_classes: classifier outputs.
        num_experts: E; None or 1 builds the dense model (width ratio still applies: ratio=0.5 dense is
            the "slim" network with the active width of an r=0.5 MoE).
        ratio: width ratio r in (0, 1]; MoE experts are int(r * planes) wide.
        top_k: experts per sample (MoE layers output top_k * expert width channels).
        router: "research" (one ResNet-20 router on the image drives every MoE layer) or "per_layer"
            (each MoE layer routes on its own input with global pooling + linear).
        in_channels: image channels.
        normalize: None or (mean, std) sequences per channel, applied inside the model.
        backend: ``sparse_moe_conv2d`` backend of the MoE layers.
        router_norm: routers standardise their pooled features so routing starts balanced (default);
            False builds the research code's router exactly (used to import its checkpoints).
        **kwargs: architecture-specific options (see the builder).

    Returns:
        The model (train mode) with ``model.config``: the arguments that rebuild it via
        ``create_model(**model.config)``.

    Raises:
        ValueError: unknown name or bad argument (the message names it).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if normalize is not None:
        if len(normalize) != 2:
            raise ValueError(f"normalize must be None or (mean, std), got {normalize!r}")
        normalize = tuple([float(v) for v in seq] for seq in normalize)
        if any(len(seq) != in_channels for seq in normalize):
            raise ValueError(f"normalize mean and std need {in_channels} values (in_channels), got {normalize!r}")
    spec = ModelSpec(
        num_experts=num_experts,
        ratio=ratio,
        top_k=top_k,
        router=router,
        backend=backend,
        router_norm=router_norm,
        gate_score=gate_score,
    )
    model = _MODELS[name](spec, num_classes=num_classes, in_channels=in_channels, normalize=normalize, **kwargs)
    model.config = {
        "name": name,
        "num_classes": num_classes,
        "num_experts": num_experts,
        "ratio": ratio,
        "top_k": top_k,
        "router": router,
        "in_channels": in_channels,
        "normalize": normalize,
        "backend": backend,
        "router_norm": router_norm,
        "gate_score": gate_score,
        **kwargs,
    }
    return model
