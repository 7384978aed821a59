"""``to_sparse``: turn a trained (MoE or dense) zoo model into an inference model that computes only
active channels, with BatchNorm folded into the convolutions.

Two deployed forms, both giving the eval-mode logits of the source model:

- ``"pathway"`` (model-level router, top-1, so exactly E pathways): the router runs once on the whole
  batch, the batch is grouped by pathway, and each group runs through a slim DENSE copy of the network
  that holds only that pathway's experts (expert e's weight rows of every MoE layer, BatchNorm folded in).
  There is no per-layer gather/scatter at all, so the cost is that of the slim network of the active width
  plus the router: the ideal.
- ``"layer"`` (any MoE model, e.g. per-layer routers or top-k > 1): the model keeps its sparse MoE layers
  (``moe_kernels.sparse_moe_conv2d``); BatchNorm is folded into every expert's weights and bias (top-1
  layers and dense convolutions), a following ``nn.ReLU`` module is fused into the op's epilogue
  (``activation="relu"``), and usage counting is switched off.

``mode="auto"`` picks "pathway" when the model allows it (it was the faster form at every batch size we
measured, see ``benchmarks/results``), else "layer". Dense models get BatchNorm folding only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.deploy.fold import find_conv_bn_pairs, fold_bn
from advmoe.nn import RoutedModel, Router, SparseMoEConv2d, moe_layers, num_pathways
from moe_kernels import sparse_moe_conv2d

MODES = ("auto", "pathway", "layer")


class ExpertConv2d(nn.Conv2d):
    """One expert of a ``SparseMoEConv2d`` as a dense convolution; accepts (and ignores) ``routing``."""

    takes_routing = True

    def forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, w, H_out, W_out)."""
        return super().forward(x)

    @classmethod
    def from_moe(cls, layer: SparseMoEConv2d, expert: int) -> ExpertConv2d:
        """Expert ``expert`` of ``layer`` (top-1 only), weight rows ``[e*w, (e+1)*w)``."""
        w = layer.expert_width
        rows = slice(expert * w, (expert + 1) * w)
        conv = cls(
            layer.in_channels, w, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            bias=layer.bias is not None, padding_mode=layer.padding_mode,
            device=layer.weight.device, dtype=layer.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(layer.weight[rows])
            if layer.bias is not None:
                conv.bias.copy_(layer.bias[rows])
        return conv


class FusedMoEConv2d(SparseMoEConv2d):
    """Inference form of ``SparseMoEConv2d``: folded BatchNorm in weight/bias, optional fused ReLU.

    Attributes:
        activation: "none" or "relu", applied in the op's epilogue.
    """

    activation: str = "none"

    def forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, out_channels, H_out, W_out), then the fused activation."""
        expert_idx, gate = self.route(x, routing)
        padding = self.padding
        if self.padding_mode != "zeros" and any(padding):
            x, padding = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), mode=self.padding_mode), (0, 0)
        return sparse_moe_conv2d(
            x, self.weight, expert_idx, self.num_experts, gate=gate, bias=self.bias, stride=self.stride,
            padding=padding, dilation=self.dilation, backend=self.backend, activation=self.activation,
        )  # fmt: skip


class PathwayMoE(nn.Module):
    """Deployed top-1 MoE with a model-level router: route once, run one slim dense network per pathway.

    Args:
        normalize: the input normalisation module, or None.
        router: the model-level router, (B, C, H, W) normalised images -> (B, E) scores.
        pathways: E slim dense networks; pathway e holds expert e of every MoE layer and takes normalised input.
        num_classes: logits per sample.
    """

    def __init__(self, normalize: nn.Module | None, router: Router, pathways: list[nn.Module], num_classes: int):
        super().__init__()
        self.normalize = normalize
        self.router = router
        self.pathways = nn.ModuleList(pathways)
        self.num_classes = num_classes

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) int64 pathway of each sample of the raw input x (B, C, H, W)."""
        xn = self.normalize(x) if self.normalize is not None else x
        return self.router(xn).argmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images x (B, C, H, W) in [0, 1]."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"input must be a (B, C, H, W) image tensor, got {getattr(x, 'shape', type(x))}")
        if self.normalize is not None:
            x = self.normalize(x)
        choice = self.router(x).argmax(dim=1)
        tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if not tracing and x.shape[0] == 1:
            return self.pathways[int(choice[0])](x)
        out = x.new_empty(x.shape[0], self.num_classes)
        for e, net in enumerate(self.pathways):
            idx = (choice == e).nonzero().squeeze(1)
            if not tracing and idx.numel() == 0:
                continue
            if not tracing and idx.numel() == x.shape[0]:
                return net(x)
            out.index_copy_(0, idx, net(x.index_select(0, idx)).to(out.dtype))
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


def fold_batchnorms(model: nn.Module, example: torch.Tensor) -> int:
    """Folds every BatchNorm2d that alone consumes a convolution's output into that convolution, in place.

    Dense ``nn.Conv2d`` and top-1 ``SparseMoEConv2d`` absorb it (each expert gets the BatchNorm's scale and
    shift); the BatchNorm becomes ``nn.Identity``. With ``FusedMoEConv2d`` a following ``nn.ReLU`` module is
    fused too. Routers are left as they are, so routing decisions stay bit-exact.

    Args:
        model: an eval-mode model; changed in place.
        example: (B, C, H, W) input for the dataflow probe.

    Returns:
        How many BatchNorms were folded.
    """
    modules = dict(model.named_modules())
    routers = [name + "." for name, m in modules.items() if isinstance(m, Router)]
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


def _can_use_pathways(model: nn.Module) -> bool:
    return isinstance(model, RoutedModel) and model.router is not None and num_pathways(model) is not None


@torch.no_grad()
def to_sparse(model: nn.Module, mode: str = "auto", example_input: torch.Tensor | None = None) -> nn.Module:
    """Inference model with the source model's eval-mode logits, computing only active channels.

    The source model is not changed. The result is in eval mode, has ``deploy_mode`` ("pathway", "layer"
    or "dense") and ``config`` (the source's ``create_model`` arguments) attributes, and runs on the
    source's device and dtype.

    Args:
        model: a zoo model (``advmoe.models.create_model``), MoE or dense, e.g. trained or loaded with
            ``load_research_checkpoint``.
        mode: "auto", "pathway" or "layer" (see the module docstring).
        example_input: (B, C, H, W) input used once to find conv -> BatchNorm chains; default: random
            images of the model's input size (32x32; 64x64 for ImageNet models).

    Returns:
        The deployed ``nn.Module``: ``deployed(x) -> logits (B, num_classes)``.

    Raises:
        ValueError: unknown mode, or "pathway" for a model without exactly E pathways (a top-1
            model-level router).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    source_config = dict(getattr(model, "config", {}) or {})
    example = _example_input(model, example_input)
    is_moe_model = bool(moe_layers(model))
    if mode == "pathway" and not (is_moe_model and _can_use_pathways(model)):
        raise ValueError(
            "mode='pathway' needs a top-1 MoE model driven by one model-level router (num_pathways(model) == E); "
            "use mode='layer' for per-layer routers or top-k > 1"
        )
    if is_moe_model and mode in ("auto", "pathway") and _can_use_pathways(model):
        src = copy.deepcopy(model).eval()
        num_experts = moe_layers(src)[0][1].num_experts
        xn = src.normalize(example) if src.normalize is not None else example
        pathways = [_pathway_network(src, e, xn) for e in range(num_experts)]
        num_classes = pathways[0](xn).shape[1]
        deployed = PathwayMoE(src.normalize, src.router, pathways, num_classes)
        deploy_mode = "pathway"
    else:
        deployed = copy.deepcopy(model).eval()
        for _, layer in moe_layers(deployed):
            layer.__class__ = FusedMoEConv2d
            layer.track_usage = False
        fold_batchnorms(deployed, example)
        deploy_mode = "layer" if is_moe_model else "dense"
    deployed.eval()
    deployed.deploy_mode = deploy_mode
    deployed.config = source_config
    return deployed
