"""``to_sparse``: turn a trained (MoE or dense) zoo model into an inference model that computes only
active channels, with BatchNorm folded into the convolutions.

Deployed forms, all giving the eval-mode logits of the source model:

- ``"pathway"`` (model-level router, top-1, so exactly E pathways): the router runs once on the whole
  batch, the batch is grouped by pathway, and each group runs through a slim DENSE copy of the network
  that holds only that pathway's experts (expert e's weight rows of every MoE layer, BatchNorm folded in).
  At B = 1 only the chosen pathway runs.
- ``"grouped"`` (same models): route, sort the batch by expert once, run ONE network whose MoE layers
  convolve each expert's contiguous slice (``GroupedMoE``), un-permute the logits. Dense layers run once on
  the full batch.
- ``"layer"`` (any MoE model, e.g. per-layer routers or top-k > 1): the model keeps its MoE layers;
  BatchNorm is folded into every expert's weights and bias (top-1 layers and dense convolutions), a
  following ``nn.ReLU`` module is fused (``activation="relu"``), usage counting is off. Top-1 layers with
  their own per-layer router become ``RoutedExpertConv2d`` (chosen expert's rows as one ``conv2d`` at
  B = 1, per-expert ``conv2d`` on the grouped batch above); others keep the sparse op.

``mode="auto"`` takes "layer" for per-layer routing or top-k > 1 (the only form that applies) and, for a
model-level top-1 router, times "pathway" against "grouped" on the model's device at ``auto_batch`` and
keeps "grouped" only when it is more than ``AUTO_MARGIN`` (5%) faster; ``deployed.deploy_reason`` says why.
Dense models get BatchNorm folding only.

With ``fold_router=True`` (default) the model-level router's BatchNorms are folded too
(``advmoe.deploy.fold_router``): a cheaper router whose scores differ from the source's by float rounding,
so samples whose routing margin is below that noise may take the other expert (``routing_agreement``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from advmoe.deploy.fold import find_conv_bn_pairs, fold_bn
from advmoe.deploy.grouped import GroupedMoE
from advmoe.deploy.layers import (
    ExpertConv2d,
    FusedMoEConv2d,
    GroupedExpertConv2d,
    GroupRanges,
    RoutedExpertConv2d,
)
from advmoe.deploy.routed_once import RoutedOnce
from advmoe.deploy.router_fold import FlatPerLayerRouter
from advmoe.nn import PerLayerRouter, RoutedModel, Router, SparseMoEConv2d, moe_layers, num_pathways
from moe_kernels.geometry import gather_rows

MODES = ("auto", "pathway", "grouped", "layer")

__all__ = ["ExpertConv2d", "FusedMoEConv2d", "GroupedMoE", "PathwayMoE", "fold_batchnorms", "to_sparse"]


class PathwayMoE(RoutedOnce):
    """Deployed top-1 MoE with a model-level router: route once, run one slim dense network per pathway.

    Args:
        normalize: the input normalisation module, or None.
        router: the model-level router, (B, C, H, W) normalised images -> (B, E) scores.
        pathways: E slim dense networks; pathway e holds expert e of every MoE layer and takes normalised input.
        num_classes: logits per sample.
    """

    def __init__(self, normalize: nn.Module | None, router: Router, pathways: list[nn.Module], num_classes: int):
        super().__init__(normalize, router)
        self.pathways = nn.ModuleList(pathways)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images x (B, C, H, W) in [0, 1]."""
        x, choice = self.normalize_and_route(x)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return self._select_forward(x, choice)  # no host sync allowed while a CUDA graph is captured
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            out = x.new_empty(x.shape[0], self.num_classes)
            for e, net in enumerate(self.pathways):
                idx = (choice == e).nonzero().squeeze(1)
                out.index_copy_(0, idx, net(gather_rows(x, idx)).to(out.dtype))
            return out
        if x.shape[0] == 1:
            return self.pathways[int(choice[0])](x)  # the chosen pathway only
        counts = torch.bincount(choice, minlength=len(self.pathways)).tolist()  # one host sync per forward
        if x.shape[0] and max(counts) == x.shape[0]:
            return self.pathways[counts.index(x.shape[0])](x)
        order = torch.argsort(choice, stable=True)
        xs = gather_rows(x, order)
        parts, start = [], 0
        for e, c in enumerate(counts):
            if c:
                parts.append(self.pathways[e](xs[start : start + c]))
            start += c
        if not parts:
            return x.new_empty(0, self.num_classes)
        logits = torch.cat(parts, 0)
        return torch.empty_like(logits).index_copy_(0, order, logits)

    def _select_forward(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Sync-free form: every pathway on the whole batch, then each sample keeps its own pathway's logits."""
        out = self.pathways[0](x)
        for e in range(1, len(self.pathways)):
            out = torch.where((choice == e)[:, None], self.pathways[e](x).to(out.dtype), out)
        return out


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _example_input(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        return example[:2]
    cfg = getattr(model, "config", {}) or {}
    p = next(model.parameters())
    size = 64 if "imagenet" in str(cfg.get("name", "")) else 32
    return torch.rand(2, cfg.get("in_channels", 3), size, size, device=p.device, dtype=p.dtype)


def fold_batchnorms(model: nn.Module, example: torch.Tensor, include_routers: bool = False) -> int:
    """Folds every BatchNorm2d that alone consumes a convolution's output into that convolution, in place.

    Dense ``nn.Conv2d`` and top-1 ``SparseMoEConv2d`` absorb it (each expert gets the BatchNorm's scale and
    shift); the BatchNorm becomes ``nn.Identity``. With ``FusedMoEConv2d`` a following ``nn.ReLU`` module is
    fused too. Routers are left as they are, so routing decisions stay bit-exact.

    Args:
        model: an eval-mode model; changed in place.
        example: (B, C, H, W) input for the dataflow probe.
        include_routers: also fold the BatchNorms inside ``Router`` submodules (default False: routers stay
            bit-exact; ``advmoe.deploy.fold_router`` folds a router on its own).

    Returns:
        How many BatchNorms were folded.
    """
    modules = dict(model.named_modules())
    routers = [] if include_routers else [name + "." for name, m in modules.items() if isinstance(m, Router) and name]
    folded = 0
    for pair in find_conv_bn_pairs(model, example, (nn.Conv2d, SparseMoEConv2d)):
        if any(pair.conv.startswith(prefix) for prefix in routers):
            continue  # routers stay bit-exact, so the deployed model takes exactly the source's expert choices
        conv, bn = modules[pair.conv], modules[pair.bn]
        repeat = 1
        if isinstance(conv, SparseMoEConv2d):
            if conv.top_k != 1:
                continue  # BatchNorm channels follow the slot, not the expert: not foldable per expert.
            repeat = conv.num_experts
        weight, bias = fold_bn(conv.weight, conv.bias, bn, repeat)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if conv.bias is None:
                conv.bias = nn.Parameter(bias)
            else:
                conv.bias.copy_(bias)
        _set_module(model, pair.bn, nn.Identity())
        if pair.relu is not None and isinstance(conv, FusedMoEConv2d):
            conv.activation = "relu"
            _set_module(model, pair.relu, nn.Identity())
        folded += 1
    return folded


def _pathway_network(model: RoutedModel, expert: int, example: torch.Tensor) -> nn.Module:
    net = copy.deepcopy(model)
    net.router, net.normalize = None, None
    for name, layer in moe_layers(net):
        _set_module(net, name, ExpertConv2d.from_moe(layer, expert))
    with torch.no_grad():
        fold_batchnorms(net, example)
    return net


def _grouped_network(model: RoutedModel, example: torch.Tensor) -> tuple[nn.Module, GroupRanges]:
    net = copy.deepcopy(model)
    net.router, net.normalize = None, None
    groups = GroupRanges()
    for _, layer in moe_layers(net):
        layer.__class__ = GroupedExpertConv2d
        layer.track_usage = False
        layer.groups = groups
    groups.counts = [example.shape[0]] + [0] * (moe_layers(net)[0][1].num_experts - 1)  # for the BN probe
    with torch.no_grad():
        fold_batchnorms(net, example)
    return net, groups


def _why_not_routed_once(model: nn.Module) -> str | None:
    """None if the model is top-1 with one model-level router (pathway/grouped apply), else the reason."""
    layers = moe_layers(model)
    if not layers:
        return "a dense model has no routing"
    if any(layer.top_k != 1 for _, layer in layers):
        return f"top_k={max(layer.top_k for _, layer in layers)} > 1 (a sample uses several experts per layer)"
    if any(layer.router is not None for _, layer in layers):
        return "the MoE layers have per-layer routers (each layer routes on its own input)"
    if not isinstance(model, RoutedModel) or model.router is None or num_pathways(model) is None:
        return "there is no single model-level router driving every MoE layer"
    return None


def _time_forms(candidates: dict[str, nn.Module], example: torch.Tensor, batch: int) -> dict[str, float]:
    from advmoe.bench.timing import time_interleaved

    shape = (batch, *example.shape[1:])
    x = torch.rand(shape, device=example.device, dtype=example.dtype)
    with torch.inference_mode():
        t = time_interleaved({k: (lambda m=m: m(x)) for k, m in candidates.items()}, example.device, 2, 7)
    return {k: v["median_ms"] for k, v in t.items()}


# grouped must beat pathway by more than this share to be picked: at B=16 on a 2-core CPU the two forms were
# within 1-3% of each other, with the winner changing between processes (hence the default auto_batch of 64,
# where pathway ran at 1.06x the ideal slim network and grouped at 1.22-1.25x; ResNet-18 CIFAR, research router)
AUTO_MARGIN = 0.05


def _pick_form(times: dict[str, float]) -> str:
    """ "grouped" if it was more than ``AUTO_MARGIN`` faster than "pathway", else "pathway"."""
    return "grouped" if times["grouped"] < (1 - AUTO_MARGIN) * times["pathway"] else "pathway"


def _routed_once(src: RoutedModel, mode: str, example: torch.Tensor, fold: bool) -> nn.Module:
    from advmoe.deploy.router_fold import fold_router

    num_experts = moe_layers(src)[0][1].num_experts
    xn = src.normalize(example) if src.normalize is not None else example
    router = fold_router(src.router, xn) if fold else src.router
    if mode == "pathway":
        pathways = [_pathway_network(src, e, xn) for e in range(num_experts)]
        return PathwayMoE(src.normalize, router, pathways, pathways[0](xn).shape[1])
    network, groups = _grouped_network(src, xn)
    return GroupedMoE(src.normalize, router, network, groups, num_experts)


@torch.no_grad()
def to_sparse(
    model: nn.Module,
    mode: str = "auto",
    example_input: torch.Tensor | None = None,
    fold_router: bool = True,
    auto_batch: int = 64,
) -> nn.Module:
    """Inference model with the source model's eval-mode logits, computing only active channels.

    The source model is not changed. The result is in eval mode, has ``deploy_mode`` ("pathway", "grouped",
    "layer" or "dense"), ``deploy_reason`` (why that form) and ``config`` (the source's ``create_model``
    arguments) attributes, and runs on the source's device and dtype.

    Args:
        model: a zoo model (``advmoe.models.create_model``), MoE or dense, e.g. trained or loaded with
            ``load_research_checkpoint``.
        mode: "auto", "pathway", "grouped" or "layer" (see the module docstring).
        example_input: (B, C, H, W) input used once to find conv -> BatchNorm chains; default: random
            images of the model's input size (32x32; 64x64 for ImageNet models).
        fold_router: fold the model-level router's BatchNorms (pathway/grouped forms; see module docstring).
        auto_batch: batch size at which ``mode="auto"`` times pathway against grouped: the batch size the
            model will serve (default 64; at B = 1 both forms run one slim network).

    Returns:
        The deployed ``nn.Module``: ``deployed(x) -> logits (B, num_classes)``.

    Raises:
        ValueError: unknown mode, or "pathway"/"grouped" for a model whose routing cannot be grouped
            (per-layer routers, top-k > 1): the message names the mode that applies ("layer").
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(auto_batch, bool) or not isinstance(auto_batch, int) or auto_batch < 1:
        raise ValueError(f"auto_batch must be an int >= 1, got {auto_batch!r}")
    source_config = dict(getattr(model, "config", {}) or {})
    example = _example_input(model, example_input)
    is_moe_model = bool(moe_layers(model))
    why_not = _why_not_routed_once(model)
    if mode in ("pathway", "grouped") and why_not is not None:
        applies = "layer" if is_moe_model else "auto (BatchNorm folding only)"
        raise ValueError(
            f"mode={mode!r} needs a top-1 MoE model driven by one model-level router, but {why_not}; "
            f"use mode={applies!r}"
        )
    if why_not is None and mode in ("auto", "pathway", "grouped"):
        src = copy.deepcopy(model).eval()
        if mode == "auto":
            forms = {m: _routed_once(src, m, example, fold_router) for m in ("pathway", "grouped")}
            times = _time_forms(forms, example, auto_batch)
            deploy_mode = _pick_form(times)
            deployed = forms[deploy_mode]
            why = (
                "was faster"
                if times[deploy_mode] <= min(times.values())
                else f"is kept (grouped not {AUTO_MARGIN:.0%} faster)"
            )
            reason = (
                f"auto: {deploy_mode} {why} on {example.device.type} at B={auto_batch} ("
                + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items())
                + ")"
            )
        else:
            deploy_mode, reason = mode, f"{mode}: requested"
            deployed = _routed_once(src, mode, example, fold_router)
    else:
        deployed = copy.deepcopy(model).eval()
        for _, layer in moe_layers(deployed):
            fast = layer.top_k == 1 and isinstance(layer.router, PerLayerRouter)
            layer.__class__ = RoutedExpertConv2d if fast else FusedMoEConv2d
            if fast and type(layer.router) is PerLayerRouter:
                layer.router.__class__ = FlatPerLayerRouter  # same state dict, same scores, fewer operator calls
            layer.track_usage = False
        fold_batchnorms(deployed, example)
        deploy_mode = "layer" if is_moe_model else "dense"
        reason = f"{deploy_mode}: " + ("requested" if mode == "layer" else (why_not or ""))
    deployed.eval()
    deployed.deploy_mode = deploy_mode
    deployed.deploy_reason = reason
    deployed.router_folded = bool(fold_router and deploy_mode in ("pathway", "grouped"))
    deployed.config = source_config
    return deployed
