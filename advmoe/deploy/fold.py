"""BatchNorm folding and the dataflow probe that finds which convolution feeds which BatchNorm.

The probe runs one forward pass with module hooks and a ``TorchFunctionMode`` that counts how often each
module output is consumed. A convolution (dense ``nn.Conv2d`` or ``SparseMoEConv2d``) can absorb the
BatchNorm that follows it when the BatchNorm is the ONLY consumer of its output; that is what
``find_conv_bn_pairs`` reports. It needs no tracing, so it works for any model whose forward is plain
Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class ConvBNPair:
    """A convolution whose output feeds only a BatchNorm.

    Attributes:
        conv: qualified name of the convolution module.
        bn: qualified name of the BatchNorm2d module.
        relu: qualified name of an ``nn.ReLU`` module that is the only consumer of the BatchNorm's output,
            or None.
    """

    conv: str
    bn: str
    relu: str | None = None


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel affine form of an eval-mode BatchNorm: ``bn(y) = scale * y + shift``.

    Args:
        bn: a BatchNorm2d with running statistics.

    Returns:
        (scale (C,), shift (C,)) in float64 for exact folding.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics (track_running_stats=False)")
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    return scale, beta - bn.running_mean.double() * scale


def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d, repeat: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution.

    Args:
        weight: (repeat * C, C_in, kh, kw) convolution weight. For a MoE convolution with E experts of width
            C and top-1 routing, repeat = E: every expert's output meets the same BatchNorm channels.
        bias: (repeat * C,) or None.
        bn: BatchNorm2d over C channels.
        repeat: how many times the BatchNorm's channels repeat along the weight rows.

    Returns:
        (weight, bias) with the dtype of ``weight``.
    """
    scale, shift = bn_scale_shift(bn)
    if weight.shape[0] != repeat * scale.numel():
        raise ValueError(
            f"weight has {weight.shape[0]} output rows but the BatchNorm has {scale.numel()} channels x {repeat}"
        )
    scale, shift = scale.repeat(repeat), shift.repeat(repeat)
    b = torch.zeros_like(scale) if bias is None else bias.detach().double()
    new_w = weight.detach().double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    new_b = b * scale + shift
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


class _UseCounter(TorchFunctionMode):
    """Counts, for each watched tensor, how many torch calls take it as an argument.

    Calls made while a hooked consumer module (BatchNorm / ReLU) is processing that tensor are not
    counted: the module itself is counted once as a consumer instead.
    """

    def __init__(self):
        super().__init__()
        self.uses: dict[int, int] = {}
        self.ignore: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.uses and id(leaf) not in self.ignore:
                self.uses[id(leaf)] += 1
        return func(*args, **kwargs)


def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor, conv_types: tuple[type, ...]) -> list[ConvBNPair]:
    """Convolution -> BatchNorm2d (-> nn.ReLU) chains in which each output has exactly one consumer.

    Args:
        model: the model (its mode is left as found; the probe runs under ``torch.no_grad``).
        example: (B, C, H, W) input for one probing forward pass.
        conv_types: module types that count as convolutions.

    Returns:
        The chains found, in forward order.
    """
    producers: dict[int, str] = {}  # id(output tensor) -> producing module name
    outputs: dict[str, int] = {}  # module name -> id(output tensor)
    keep: list[torch.Tensor] = []  # keeps the ids valid during the probe
    consumers: dict[int, list[str]] = {}  # id(tensor) -> hooked modules that consumed it
    counter = _UseCounter()
    handles = []

    def on_output(name):
        def hook(module, inputs, output):
            if isinstance(module, (nn.BatchNorm2d, nn.ReLU)) and inputs and isinstance(inputs[0], torch.Tensor):
                counter.ignore.remove(id(inputs[0]))
            if isinstance(output, torch.Tensor):
                producers[id(output)] = name
                outputs[name] = id(output)
                counter.uses.setdefault(id(output), 0)
                keep.append(output)

        return hook

    def on_input(name):
        def hook(module, inputs):
            tid = id(inputs[0])
            consumers.setdefault(tid, []).append(name)
            counter.ignore.append(tid)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.BatchNorm2d, nn.ReLU)):
            handles.append(module.register_forward_pre_hook(on_input(name)))
        if isinstance(module, (*conv_types, nn.BatchNorm2d, nn.ReLU)):
            handles.append(module.register_forward_hook(on_output(name)))
    try:
        with torch.no_grad(), counter:
            model(example)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())

    def sole_consumer(tid: int | None) -> str | None:
        users = consumers.get(tid, [])
        return users[0] if tid is not None and len(users) == 1 and counter.uses.get(tid) == 0 else None

    pairs = []
    for conv_name, tid in outputs.items():
        if not isinstance(modules[conv_name], conv_types):
            continue
        bn_name = sole_consumer(tid)
        if bn_name is None or not isinstance(modules[bn_name], nn.BatchNorm2d):
            continue
        relu = sole_consumer(outputs.get(bn_name))
        relu = relu if relu is not None and isinstance(modules[relu], nn.ReLU) else None
        pairs.append(ConvBNPair(conv_name, bn_name, relu))
    return pairs
