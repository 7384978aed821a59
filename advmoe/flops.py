"""FLOP counting with fvcore, aware of the sparse MoE op.

Convention: fvcore's, one multiply-add = one FLOP. ``moe_kernels::sparse_moe_conv2d`` counts only the
channels it computes (B x k*w output channels, not E*w), so a MoE model's count is its active pathway;
the router's convolutions are ordinary convs and count too. Ops fvcore cannot price are reported (a
warning and ``FlopReport.unsupported``), never silently taken as zero; bookkeeping ops that cost no
arithmetic (top-k selection, index counting, comparisons) are priced at zero explicitly.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

_ZERO_COST_OPS = (
    "aten::argmax",
    "aten::topk",
    "aten::sort",
    "aten::argsort",
    "aten::index_add_",
    "aten::index_add",
    "aten::ones_like",
    "aten::rsub",
    "aten::lt",
    "aten::le",
    "aten::ne",
    "aten::expand_as",
    "aten::clone",
    "aten::max_pool2d",
    "aten::dropout_",
    "aten::feature_dropout",
    "aten::alias",
    "aten::lift_fresh",
    "aten::bincount",
    "aten::numel",
    "aten::dim",
    "aten::pad",
)
# Elementwise arithmetic fvcore does not price by default; counted as one FLOP per output element
# only when ``count_elementwise=True`` (fvcore's own convention leaves them out).
_ELEMENTWISE_OPS = (
    "aten::add",
    "aten::add_",
    "aten::sub",
    "aten::mul",
    "aten::mul_",
    "aten::div",
    "aten::softmax",
    # the routers' input standardisation (advmoe.nn.routers.RouterInputNorm) on (B, C) pooled features
    "aten::mean",
    "aten::var",
    "aten::pow",
    "aten::sqrt",
    "aten::where",
)


def _shape(value) -> list[int]:
    return list(value.type().sizes())


def sparse_moe_conv2d_flop_jit(inputs, outputs) -> int:
    """fvcore handle for ``moe_kernels::sparse_moe_conv2d``: (output elements) x C_in x kh x kw.

    The output (B, k*w, H_out, W_out) holds only the computed expert channels, so this is the cost of
    the active experts, matching fvcore's convolution count for a dense conv of the same output.
    """
    weight = _shape(inputs[1])
    out = _shape(outputs[0])
    count = 1
    for d in out:
        count *= d
    return count * weight[1] * weight[2] * weight[3]


def _zero(inputs, outputs) -> int:
    return 0


def _elementwise(inputs, outputs) -> int:
    count = 1
    for d in _shape(outputs[0]):
        count *= d
    return count


@dataclass
class FlopReport:
    """Result of ``flop_breakdown``.

    Attributes:
        total: FLOPs of the whole batch.
        per_image: total / B.
        by_module: FLOPs per module name ("" is the whole model), whole batch.
        by_operator: FLOPs per operator kind, whole batch.
        unsupported: operators fvcore could not price, with how often they ran.
    """

    total: float
    per_image: float
    by_module: dict[str, float] = field(default_factory=dict)
    by_operator: dict[str, float] = field(default_factory=dict)
    unsupported: dict[str, int] = field(default_factory=dict)


def flop_breakdown(model: nn.Module, inputs: torch.Tensor, count_elementwise: bool = False) -> FlopReport:
    """Counts the FLOPs of one forward of ``model(inputs)`` in eval mode (mode restored afterwards).

    Args:
        model: any module; MoE layers are priced at their active channels.
        inputs: (B, C, H, W) batch (B >= 1).
        count_elementwise: also price elementwise add/sub/mul/div/softmax at 1 FLOP per output element
            (fvcore's convention, the default False, leaves them out).

    Returns:
        A ``FlopReport``. Operators that could not be priced are listed in ``unsupported`` and warned
        about.
    """
    with warnings.catch_warnings():  # fvcore calls the deprecated torch.jit.script on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from fvcore.nn import FlopCountAnalysis

    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or inputs.shape[0] < 1:
        raise ValueError(f"inputs must be a batch tensor with B >= 1, got {getattr(inputs, 'shape', inputs)}")
    was_training = model.training
    tracking = [(m, m.track_usage) for m in model.modules() if hasattr(m, "track_usage")]
    model.eval()
    for m, _ in tracking:
        m.track_usage = False
    try:
        analysis = FlopCountAnalysis(model, inputs)
        handles = {"moe_kernels::sparse_moe_conv2d": sparse_moe_conv2d_flop_jit}
        handles.update({op: _zero for op in _ZERO_COST_OPS})
        if count_elementwise:
            handles.update({op: _elementwise for op in _ELEMENTWISE_OPS})
        analysis.set_op_handle(**handles)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            total = float(analysis.total())
        unsupported = Counter(analysis.unsupported_ops())
        if not count_elementwise:
            for op in _ELEMENTWISE_OPS:
                unsupported.pop(op, None)
        report = FlopReport(
            total=total,
            per_image=total / inputs.shape[0],
            by_module={k: float(v) for k, v in analysis.by_module().items()},
            by_operator={k: float(v) for k, v in analysis.by_operator().items()},
            unsupported=dict(unsupported),
        )
    finally:
        model.train(was_training)
        for m, flag in tracking:
            m.track_usage = flag
    if report.unsupported:
        warnings.warn(
            f"FLOP count skipped operators it cannot price: {report.unsupported}; the total leaves them out",
            stacklevel=2,
        )
    return report


def count_flops(model: nn.Module, inputs: torch.Tensor) -> float:
    """Total fvcore FLOPs (one multiply-add = one FLOP) of ``model(inputs)`` for the whole batch.

    MoE layers count only their active experts' channels; routers are included. Divide by B for the
    per-image figure. See ``flop_breakdown`` for the per-module view and the unpriced operators.
    """
    return flop_breakdown(model, inputs).total
