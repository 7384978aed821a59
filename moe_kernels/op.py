"""The registered op ``moe_kernels::sparse_moe_conv2d``: schema, fake kernel, backward op, autograd,
and the public function ``sparse_moe_conv2d``.

The ladder: backend kernels (reference / C++ / Triton / CUDA) -> the custom op, which picks the
backend by name -> its fake (shape-only) kernel for torch.compile / torch.export -> an explicit backward
op (also a custom op, so the backward traces too) -> ``sparse_moe_conv2d()``, which validates the
arguments and resolves ``backend="auto"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_kernels._validate import check_sparse_moe_conv2d_args, pair
from moe_kernels.backends import backend_uses_plan, get_backend, resolve_backend
from moe_kernels.call import ConvCall
from moe_kernels.geometry import output_hw, output_memory_format
from moe_kernels.plan import RoutingPlan, check_expert_idx_values

_ACTIVATIONS = ("none", "relu")


def _plan_for(plan: Sequence[torch.Tensor], expert_idx: torch.Tensor, num_experts: int, backend: str):
    """The RoutingPlan a backend gets: rebuilt around the passed plan tensors ([sample, slot, counts, offsets],
    validated when built), built here when none was passed and the backend uses one (this validates the
    indices), else None after the index check (the compiled cpu/cuda backends group the slots themselves)."""
    batch, top_k = expert_idx.shape
    if len(plan) == 4:
        if plan[0].shape != (batch * top_k,) or plan[2].shape != (num_experts,):
            raise ValueError(
                f"plan tensors describe {plan[0].shape[0]} slots and {plan[2].shape[0]} experts, the call has "
                f"B*k = {batch * top_k} slots and E = {num_experts}: a stale routing plan"
            )
        return RoutingPlan.from_tensors(list(plan), batch, top_k)
    if len(plan) != 0:
        raise ValueError(f"plan must be [] or the 4 tensors of RoutingPlan.tensors(), got {len(plan)} tensors")
    if backend_uses_plan(backend):
        return RoutingPlan.build(expert_idx, num_experts)
    check_expert_idx_values(expert_idx, num_experts)
    return None


def _call(x, weight, expert_idx, gate, bias, num_experts, stride, padding, dilation, backend, plan) -> ConvCall:
    """The backend's ``ConvCall`` from the registered ops' arguments (in their schema order), with its plan."""
    routing_plan = _plan_for(plan, expert_idx, num_experts, backend)
    conv = (tuple(stride), tuple(padding), tuple(dilation))
    return ConvCall(x, weight, expert_idx, num_experts, gate, bias, *conv, routing_plan)


# x: (B, C_in, H, W); weight: (E*w, C_in, kh, kw); expert_idx: (B, k); gate: (B, k); bias: (E*w,);
# plan: [] or [sample (B*k,), slot (B*k,), counts (E,), offsets (E+1,)] -> (B, k*w, H_out, W_out)
@torch.library.custom_op("moe_kernels::sparse_moe_conv2d", mutates_args=())
def _sparse_moe_conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_idx: torch.Tensor,
    gate: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_experts: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    backend: str,
    plan: Sequence[torch.Tensor],
) -> torch.Tensor:
    # The indices are checked when the plan is built (or here for the compiled cpu/cuda backends, whose
    # kernels check again), so a bad index from Python is an error before any compiled code runs.
    call = _call(x, weight, expert_idx, gate, bias, num_experts, stride, padding, dilation, backend, plan)
    forward, _ = get_backend(backend)
    # Gradients come from the explicit backward op: the kernels' internal aten calls must not record autograd
    # (they would try to save inference-mode tensors under torch.inference_mode()).
    with torch.no_grad():
        y = forward(call)
    if activation == "relu":
        y = torch.relu_(y) if not y.requires_grad else torch.relu(y)
    y = y.contiguous(memory_format=output_memory_format(x))
    # A fresh tensor, never a view: callers may apply in-place ops (nn.ReLU(inplace=True)) to the output.
    return y.clone() if y._base is not None else y


@_sparse_moe_conv2d_op.register_fake
def _(x, weight, expert_idx, gate, bias, num_experts, stride, padding, dilation, activation, backend, plan):
    batch, top_k = expert_idx.shape
    width = weight.shape[0] // num_experts
    h_out, w_out = output_hw(x, weight, stride, padding, dilation)
    return x.new_empty((batch, top_k * width, h_out, w_out)).contiguous(memory_format=output_memory_format(x))


# Gradients of (x, weight, bias, gate); an entry not asked for in `needs` comes back as an empty tensor.
@torch.library.custom_op("moe_kernels::sparse_moe_conv2d_backward", mutates_args=())
def _sparse_moe_conv2d_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_idx: torch.Tensor,
    gate: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_experts: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
    needs: Sequence[bool],
    plan: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    call = _call(x, weight, expert_idx, gate, bias, num_experts, stride, padding, dilation, backend, plan)
    _, backward = get_backend(backend)
    with torch.no_grad():
        grads = backward(grad_out, call, tuple(bool(n) for n in needs))
    like = (x, weight, bias, gate)
    return tuple(
        x.new_empty(0) if g is None else g.contiguous().to(ref.dtype) for g, ref in zip(grads, like, strict=True)
    )


@_sparse_moe_conv2d_backward_op.register_fake
def _(grad_out, x, weight, expert_idx, gate, bias, num_experts, stride, padding, dilation, backend, needs, plan):
    like = (x, weight, bias, gate)
    return tuple(
        t.new_empty(t.shape) if (n and t is not None) else x.new_empty(0) for n, t in zip(needs, like, strict=True)
    )


def _setup_context(ctx, inputs, output):
    x, weight, expert_idx, gate, bias, num_experts, stride, padding, dilation, activation, backend, plan = inputs
    ctx.save_for_backward(x, weight, expert_idx, gate, bias, output if activation == "relu" else None, *plan)
    ctx.args = (num_experts, stride, padding, dilation, backend)


def _backward(ctx, grad_out):
    x, weight, expert_idx, gate, bias, relu_out, *plan = ctx.saved_tensors
    num_experts, stride, padding, dilation, backend = ctx.args
    if relu_out is not None:
        grad_out = grad_out * (relu_out > 0)
    nx, nw, _, ng, nb, *_ = ctx.needs_input_grad
    needs = [nx, nw, nb and bias is not None, ng and gate is not None]
    gx, gw, gb, gg = _sparse_moe_conv2d_backward_op(
        grad_out, x, weight, expert_idx, gate, bias, num_experts, stride, padding, dilation, backend, needs, plan
    )
    pick = [g if n else None for g, n in zip((gx, gw, gb, gg), needs, strict=True)]
    return pick[0], pick[1], None, pick[3], pick[2], None, None, None, None, None, None, [None] * len(plan)


torch.library.register_autograd("moe_kernels::sparse_moe_conv2d", _backward, setup_context=_setup_context)


def sparse_moe_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_idx: torch.Tensor,
    num_experts: int,
    gate: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    backend: str = "auto",
    activation: str = "none",
    plan: RoutingPlan | None = None,
) -> torch.Tensor:
    """Sparse channel-gated MoE convolution: computes only the output channels of the selected experts.

    ``y[b, j*w:(j+1)*w] = gate[b, j] * (conv2d(x[b], weight[e*w:(e+1)*w]) + bias[e*w:(e+1)*w])`` with
    ``e = expert_idx[b, j]``; then ``activation`` (ReLU) if asked. Differentiable
    in x, weight, bias and gate.

    Args:
        x: (B, C_in, H, W) input, fp16/bf16/fp32 (fp64 on the reference and CPU backends).
        weight: (E * w, C_in, kh, kw); rows ``[e*w, (e+1)*w)`` belong to expert e (the layout of an
            ``nn.Conv2d`` with E*w output channels).
        expert_idx: (B, k) int64 expert indices in ``[0, E)``.
        num_experts: E; ``weight.shape[0]`` must divide by it.
        gate: (B, k) gates, or None for all ones (no gate gradient then).
        bias: (E * w,) or None.
        stride, padding, dilation: int or pair, as in ``torch.nn.functional.conv2d``.
        backend: "auto", "reference", "cpu", "triton", "cuda" or "slices" (see ``available_backends()``;
            "slices" is never picked by "auto").
        activation: "none" or "relu": applied after the gate, inside the registered op, as a separate
            (in-place when no gradient is recorded) pass over the output; no backend fuses it into its
            kernel epilogue. The op's backward masks the gradient with the saved output.
        plan: a ``moe_kernels.RoutingPlan`` built from this very ``expert_idx`` tensor and ``num_experts``
            (``RoutingPlan.build(expert_idx, E)``), shared by the layers that use the same routing; None
            makes the registered op build one inside, in the forward and again in the backward, for the
            backends that use it (reference, triton, slices).

    Returns:
        (B, k * w, H_out, W_out), channels_last if x is channels_last.

    Raises:
        TypeError, ValueError: bad arguments (the message names the argument), or a stale plan (built for
            another expert_idx tensor, batch size, k, E or device).
        moe_kernels.BackendUnavailable: the named backend is not built here (the message says how).
    """
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    check_sparse_moe_conv2d_args(ConvCall(x, weight, expert_idx, num_experts, gate, bias, stride, padding, dilation))
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if gate is not None and gate.dtype != x.dtype:
        gate = gate.to(x.dtype)
    name = resolve_backend(backend, x.device, call=(x, weight, num_experts, stride))
    if plan is not None:
        if not isinstance(plan, RoutingPlan):
            raise TypeError(f"plan must be a moe_kernels.RoutingPlan or None, got {type(plan).__name__}")
        plan.check_matches(expert_idx.shape[0], expert_idx.shape[1], num_experts, x.device)
        if plan.source is not None and plan.source is not expert_idx:
            raise ValueError(
                "plan was built from another expert_idx tensor: pass the tensor it was built from, or build a "
                "new plan with RoutingPlan.build(expert_idx, num_experts)"
            )
    # Without a plan, the registered op builds one inside for the backends that use it (opaque to tracers such
    # as fvcore's and torch.export's, like the rest of the op).
    plan_tensors = plan.tensors() if plan is not None else []
    return _sparse_moe_conv2d_op(
        x,
        weight,
        expert_idx,
        gate,
        bias,
        num_experts,
        list(stride),
        list(padding),
        list(dilation),
        activation,
        name,
        plan_tensors,
    )
