"""Property-based checks of ``sparse_moe_conv2d`` (hypothesis), run by ``test_op_properties.py`` in a
subprocess so that a crash of the interpreter (segfault, abort in C++/CUDA) fails the test instead of
killing the test run.

Valid inputs: every CPU-testable backend equals the reference, forward and backward, on random shapes.
Invalid inputs: every backend raises a Python exception (TypeError/ValueError/RuntimeError) and nothing
crashes; the C++ entry points are also called directly, bypassing the Python validation.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import moe_kernels  # noqa: E402

torch.set_num_threads(1)
BACKENDS = [b for b in ("reference", "cpu", "triton") if b in moe_kernels.available_backends()]
FAST = [b for b in BACKENDS if b != "triton"]
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@st.composite
def op_args(draw):
    """A random valid configuration: dict of tensors and conv parameters (float64)."""
    experts = draw(st.integers(1, 4))
    top_k = draw(st.integers(1, experts))
    width = draw(st.integers(1, 5))
    c_in = draw(st.integers(1, 6))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 9))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 9))
    batch = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(experts, generator=g)[:top_k] for _ in range(batch)]
    expert_idx = torch.stack(rows) if rows else torch.zeros(0, top_k, dtype=torch.long)
    return dict(
        x=torch.randn(batch, c_in, h, w, generator=g, dtype=torch.float64),
        weight=torch.randn(experts * width, c_in, kh, kw, generator=g, dtype=torch.float64),
        expert_idx=expert_idx,
        num_experts=experts,
        gate=torch.rand(batch, top_k, generator=g, dtype=torch.float64) if draw(st.booleans()) else None,
        bias=torch.randn(experts * width, generator=g, dtype=torch.float64) if draw(st.booleans()) else None,
        stride=stride,
        padding=padding,
        dilation=dilation,
    )


def _run(args, backend):
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in args.items() if torch.is_tensor(v)}
    kwargs = {**args, **leaves}
    y = moe_kernels.sparse_moe_conv2d(**kwargs, backend=backend)
    grad_out = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    inputs = [t for t in leaves.values() if t.requires_grad]
    grads = torch.autograd.grad(y, inputs, grad_out, allow_unused=True) if y.numel() and inputs else []
    return y, grads


def _dtype_for(backend):
    return torch.float32 if backend == "triton" else torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_inputs_match_reference(backend):
    @settings(max_examples=12 if backend == "triton" else 60, **SETTINGS)
    @given(op_args())
    def check(args):
        dtype = _dtype_for(backend)
        args = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()}
        y_ref, g_ref = _run(args, "reference")
        y, g = _run(args, backend)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
        assert y.shape == y_ref.shape
        torch.testing.assert_close(y, y_ref, **tol)
        for a, b in zip(g, g_ref, strict=True):
            if b is None:
                assert a is None or not a.abs().any()
            else:
                torch.testing.assert_close(a, b, **tol)

    check()


def _corrupt(args, kind, value):
    """Returns a copy of ``args`` with one argument made invalid."""
    bad = dict(args)
    batch, top_k = args["expert_idx"].shape
    experts = args["num_experts"]
    if kind == "idx_high":
        bad["expert_idx"] = torch.full((batch, top_k), experts + value, dtype=torch.long)
    elif kind == "idx_negative":
        bad["expert_idx"] = torch.full((batch, top_k), -1 - value, dtype=torch.long)
    elif kind == "idx_float":
        bad["expert_idx"] = args["expert_idx"].double()
    elif kind == "idx_rank":
        bad["expert_idx"] = args["expert_idx"][:, 0]
    elif kind == "gate_shape":
        bad["gate"] = torch.ones(batch, top_k + 1 + value, dtype=args["x"].dtype)
    elif kind == "bias_shape":
        bad["bias"] = torch.zeros(args["weight"].shape[0] + 1 + value, dtype=args["x"].dtype)
    elif kind == "x_rank":
        bad["x"] = args["x"][:, 0]
    elif kind == "weight_dtype":
        other = torch.float16 if args["x"].dtype != torch.float16 else torch.float32
        bad["weight"] = args["weight"].to(other)
    elif kind == "rows_not_divisible":
        bad["num_experts"] = args["weight"].shape[0] + 1 + value
    elif kind == "stride":
        bad["stride"] = -value
    elif kind == "padding":
        bad["padding"] = -1 - value
    elif kind == "too_small":
        bad["x"] = args["x"][:, :, :1, :1]
        bad["padding"] = 0
        bad["weight"] = torch.randn(args["weight"].shape[0], args["weight"].shape[1], 3, 3, dtype=args["x"].dtype)
    elif kind == "channels":
        bad["x"] = torch.randn(batch, args["x"].shape[1] + 1, *args["x"].shape[2:], dtype=args["x"].dtype)
    elif kind == "num_experts_zero":
        bad["num_experts"] = 0 - value
    return bad


KINDS = [
    "idx_high",
    "idx_negative",
    "idx_float",
    "idx_rank",
    "gate_shape",
    "bias_shape",
    "x_rank",
    "weight_dtype",
    "rows_not_divisible",
    "stride",
    "padding",
    "too_small",
    "channels",
    "num_experts_zero",
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_inputs_raise(backend):
    @settings(max_examples=20 if backend == "triton" else 80, **SETTINGS)
    @given(op_args(), st.sampled_from(KINDS), st.integers(0, 10**6))
    def check(args, kind, value):
        args = {
            k: v.to(_dtype_for(backend)) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()
        }
        bad = _corrupt(args, kind, value)
        if kind in ("idx_high", "idx_negative") and bad["expert_idx"].numel() == 0:
            return  # no index to be wrong
        with pytest.raises((TypeError, ValueError, RuntimeError)):
            moe_kernels.sparse_moe_conv2d(**bad, backend=backend)

    check()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ CPU extension not built")
def test_cpp_entry_points_check_indices():
    """The C++ ops refuse out-of-range indices themselves, without the Python validation in front."""

    @settings(max_examples=60, **SETTINGS)
    @given(op_args(), st.integers(-(10**9), 10**9))
    def check(args, value):
        if args["expert_idx"].numel() == 0 or 0 <= value < args["num_experts"]:
            return
        idx = args["expert_idx"].clone()
        idx.view(-1)[0] = value
        fwd = torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd
        with pytest.raises(RuntimeError):
            fwd(
                args["x"],
                args["weight"],
                idx,
                args["gate"],
                args["bias"],
                args["num_experts"],
                list(args["stride"]),
                list(args["padding"]),
                list(args["dilation"]),
            )

    check()
