"""Every CPU-testable backend of sparse_moe_conv2d against the reference, forward and backward.

The expected values come from ``sparse_moe_conv2d_ref`` differentiated by plain autograd, which is
independent of every backend's explicit backward (the reference backend's included).
"""

import pytest
import torch
from helpers.op_cases import CASES, assert_close, custom_op_args, make_inputs

import moe_kernels
from moe_kernels import sparse_moe_conv2d, sparse_moe_conv2d_ref

CPU_BACKENDS = ["reference", "cpu", "triton", "slices"]
# The Triton interpreter is slow: it gets the cases that exercise distinct code paths.
TRITON_CASES = [
    "basic",
    "no_bias_no_gate",
    "k2_of_4",
    "stride2_pad0",
    "dilation2",
    "empty_expert",
    "batch0",
    "channels_last",
    "odd_big",
]


def _cases_for(backend):
    names = TRITON_CASES if backend == "triton" else list(CASES)
    return [pytest.param(backend, name, id=f"{backend}-{name}") for name in names]


ALL = [p for b in CPU_BACKENDS for p in _cases_for(b)]


def _run(fn, case, inputs):
    x, weight, expert_idx, gate, bias = inputs
    return fn(x, weight, expert_idx, case.experts, gate, bias, case.stride, case.padding, case.dilation)


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    tensors = [t for t in (inputs[0], inputs[1], inputs[3], inputs[4]) if t is not None]
    return torch.autograd.grad(out, tensors, grad_out, allow_unused=False)


def test_cpu_and_triton_backends_are_present():
    present = moe_kernels.available_backends()
    for name in CPU_BACKENDS:
        assert name in present, f"backend {name!r} missing: {moe_kernels.unavailable_reason(name)}"


@pytest.mark.parametrize("backend,case_name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference(backend, case_name, dtype):
    case = CASES[case_name]
    inputs = make_inputs(case, dtype)
    ref_inputs = make_inputs(case, dtype)
    out = _run(lambda *a: sparse_moe_conv2d(*a, backend=backend), case, inputs)
    expected = _run(sparse_moe_conv2d_ref, case, ref_inputs)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert_close(out, expected, tol, tol, "forward")
    if case.channels_last and case.batch > 0:
        assert out.is_contiguous(memory_format=torch.channels_last)
    if case.batch == 0:
        return
    names = [n for n, t in zip(("x", "weight", "gate", "bias"), (0, 1, 3, 4), strict=True) if inputs[t] is not None]
    for name, got, want in zip(names, _grads(out, inputs), _grads(expected, ref_inputs), strict=True):
        assert_close(got, want, tol * 10, tol * 10, f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", "cpu", "slices"])
@pytest.mark.parametrize("case_name", ["basic", "k2_of_4", "stride2_pad0", "dilation2", "empty_expert"])
def test_gradcheck_fp64(backend, case_name):
    case = CASES[case_name]
    x, weight, expert_idx, gate, bias = make_inputs(case, torch.float64)

    def fn(x, weight, gate, bias):
        return sparse_moe_conv2d(
            x, weight, expert_idx, case.experts, gate, bias, case.stride, case.padding, case.dilation, backend=backend
        )

    assert torch.autograd.gradcheck(fn, (x, weight, gate, bias))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_rule(backend, dtype):
    """The backend's low-precision error against an fp32 reference is at most ~2x that of plain PyTorch
    computing the reference in the same low precision (flash-attention's rule)."""
    case = CASES["odd_big"]
    inputs32 = make_inputs(case, torch.float32)
    expected = _run(sparse_moe_conv2d_ref, case, inputs32)
    low = make_inputs(case, dtype)
    out = _run(lambda *a: sparse_moe_conv2d(*a, backend=backend), case, low)
    base_inputs = make_inputs(case, dtype)
    baseline = _run(sparse_moe_conv2d_ref, case, base_inputs)
    assert out.dtype == dtype
    err = (out.float() - expected).abs().max().item()
    base_err = (baseline.float() - expected).abs().max().item()
    assert err <= 2 * base_err + 1e-5, f"{backend} {dtype}: max err {err:.3e} vs plain PyTorch {base_err:.3e}"
    grads = _grads(out, low)
    ref_grads = _grads(expected, inputs32)
    base_grads = _grads(baseline, base_inputs)
    for got, want, base in zip(grads, ref_grads, base_grads, strict=True):
        err = (got.float() - want).abs().max().item()
        base_err = (base.float() - want).abs().max().item()
        assert err <= 2 * base_err + 1e-4, f"grad: max err {err:.3e} vs plain PyTorch {base_err:.3e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_plan", [False, True], ids=["no_plan", "plan"])
def test_opcheck(backend, with_plan):
    case = CASES["k2_of_4"]
    inputs = make_inputs(case, torch.float64 if backend != "triton" else torch.float32)
    plan = moe_kernels.RoutingPlan.build(inputs[2], case.experts).tensors() if with_plan else []
    args = custom_op_args(case, inputs, backend, plan)
    torch.library.opcheck(torch.ops.moe_kernels.sparse_moe_conv2d.default, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_relu(backend):
    case = CASES["basic"]
    inputs = make_inputs(case, torch.float32)
    out = _run(lambda *a: sparse_moe_conv2d(*a, backend=backend, activation="relu"), case, inputs)
    ref_inputs = make_inputs(case, torch.float32)
    expected = torch.relu(_run(sparse_moe_conv2d_ref, case, ref_inputs))
    assert_close(out, expected, 1e-5, 1e-5, "relu forward")
    for got, want in zip(_grads(out, inputs), _grads(expected, ref_inputs), strict=True):
        assert_close(got, want, 1e-4, 1e-4, "relu grad")
