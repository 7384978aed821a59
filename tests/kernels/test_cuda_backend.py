"""The ``cuda`` backend against the reference, forward and backward, on a GPU (skipped without one).

Run on a GPU machine after `ADVMOE_CUDA=1 pip install --no-build-isolation -e .` with
`python -m pytest -q -m cuda tests/kernels/test_cuda_backend.py`. Expected values come from the reference
differentiated by plain autograd in fp64 on the CPU; TF32 is switched off so fp32 is compared as fp32.
"""

from __future__ import annotations

import pytest
import torch
from helpers.op_cases import CASES, Case, assert_close, custom_op_args, make_inputs

import moe_kernels
from moe_kernels import sparse_moe_conv2d, sparse_moe_conv2d_ref

pytestmark = pytest.mark.cuda

REALISTIC = {
    "resnet_3x3_k1": Case(batch=64, c_in=64, width=64, experts=2, top_k=1, size=(32, 32)),
    "resnet_stride2_k2": Case(batch=32, c_in=64, width=64, experts=4, top_k=2, size=(16, 16), stride=(2, 2)),
    "resnet_1x1_shortcut": Case(batch=48, c_in=128, width=128, experts=2, size=(8, 8), kernel=(1, 1), padding=(0, 0)),
}
TOL = {torch.float32: 2e-4, torch.float64: 1e-9}


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _call(case, inputs, **kwargs):
    x, weight, expert_idx, gate, bias = inputs
    return sparse_moe_conv2d(
        x, weight, expert_idx, case.experts, gate, bias, case.stride, case.padding, case.dilation, **kwargs
    )


def _ref(case, inputs):
    x, weight, expert_idx, gate, bias = inputs
    return sparse_moe_conv2d_ref(
        x, weight, expert_idx, case.experts, gate, bias, case.stride, case.padding, case.dilation
    )


def _grads(out, inputs, seed=1):
    """Gradients of <out, G> for a fixed random G w.r.t. the float inputs present (x, weight, gate, bias)."""
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    tensors = [t for t in (inputs[0], inputs[1], inputs[3], inputs[4]) if t is not None]
    return torch.autograd.grad(out, tensors, grad_out)


def _detached(inputs):
    return tuple(t.detach() if t is not None else None for t in inputs)


def _names(inputs):
    return [n for n, i in zip(("x", "weight", "gate", "bias"), (0, 1, 3, 4), strict=True) if inputs[i] is not None]


def _check_against_fp64_reference(case, dtype, atol, rtol):
    inputs = make_inputs(case, dtype, device="cuda")
    ref_inputs = make_inputs(case, torch.float64)
    out = _call(case, inputs, backend="cuda")
    expected = _ref(case, ref_inputs)
    assert out.dtype == dtype and out.device.type == "cuda"
    assert_close(out.cpu(), expected, atol, rtol, "forward")
    if case.batch == 0:
        return
    for name, got, want in zip(_names(inputs), _grads(out, inputs), _grads(expected, ref_inputs), strict=True):
        assert_close(got.cpu(), want, 10 * atol, 10 * rtol, f"grad {name}")


def test_cuda_backend_is_present():
    assert "cuda" in moe_kernels.available_backends(), moe_kernels.unavailable_reason("cuda")


def test_auto_picks_cuda_on_gpu():
    from moe_kernels.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == "cuda"


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference(case_name, dtype):
    _check_against_fp64_reference(CASES[case_name], dtype, TOL[dtype], TOL[dtype])


@pytest.mark.parametrize("case_name", list(REALISTIC))
def test_realistic_shapes_fp32(case_name):
    _check_against_fp64_reference(REALISTIC[case_name], torch.float32, 1e-3, 1e-3)


@pytest.mark.parametrize("case_name", ["odd_big", "k2_of_4", "resnet_3x3_k1", "resnet_stride2_k2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_rule(case_name, dtype):
    """Error against an fp32 reference is at most ~2x that of plain PyTorch (the reference backend) in the
    same low precision, forward and every gradient (flash-attention's rule)."""
    case = CASES.get(case_name) or REALISTIC[case_name]
    exact_inputs = make_inputs(case, torch.float32, device="cuda")
    expected = _ref(case, exact_inputs)
    low = make_inputs(case, dtype, device="cuda")
    out = _call(case, low, backend="cuda")
    base_inputs = make_inputs(case, dtype, device="cuda")
    baseline = _call(case, base_inputs, backend="reference")
    assert out.dtype == dtype
    err = (out.float() - expected).abs().max().item()
    base_err = (baseline.float() - expected).abs().max().item()
    assert err <= 2 * base_err + 1e-5, f"forward: max err {err:.3e} vs plain PyTorch {base_err:.3e}"
    pairs = zip(
        _names(low), _grads(out, low), _grads(expected, exact_inputs), _grads(baseline, base_inputs), strict=True
    )
    for name, got, want, base in pairs:
        err = (got.float() - want).abs().max().item()
        base_err = (base.float() - want).abs().max().item()
        assert err <= 2 * base_err + 1e-4, f"grad {name}: max err {err:.3e} vs plain PyTorch {base_err:.3e}"


@pytest.mark.parametrize("case_name", ["basic", "k2_of_4", "dilation2", "empty_expert"])
def test_gradcheck_fp64(case_name):
    case = CASES[case_name]
    x, weight, expert_idx, gate, bias = make_inputs(case, torch.float64, device="cuda")

    def fn(x, weight, gate, bias):
        return sparse_moe_conv2d(
            x, weight, expert_idx, case.experts, gate, bias, case.stride, case.padding, case.dilation, backend="cuda"
        )

    assert torch.autograd.gradcheck(fn, (x, weight, gate, bias))


def test_duplicate_experts_in_a_sample():
    """Frozen routing may send one sample twice to the same expert: the input gradient adds both."""
    case = CASES["k2_of_4"]
    inputs = list(make_inputs(case, torch.float32, device="cuda"))
    inputs[2] = torch.ones_like(inputs[2])  # every slot -> expert 1
    ref_inputs = list(make_inputs(case, torch.float64))
    ref_inputs[2] = torch.ones_like(ref_inputs[2])
    out, expected = _call(case, inputs, backend="cuda"), _ref(case, ref_inputs)
    assert_close(out.cpu(), expected, 1e-4, 1e-4, "forward")
    for name, got, want in zip(_names(inputs), _grads(out, inputs), _grads(expected, ref_inputs), strict=True):
        assert_close(got.cpu(), want, 1e-3, 1e-3, f"grad {name}")


def test_int32_expert_idx_and_fp32_gate_with_fp16_input():
    case = CASES["basic"]
    x, weight, expert_idx, gate, bias = make_inputs(case, torch.float16, device="cuda")
    gate32 = gate.detach().float()
    geometry = (case.experts, list(case.stride), list(case.padding), list(case.dilation))
    y = torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd(x, weight, expert_idx.int(), gate32, bias, *geometry)
    ref = torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd(x, weight, expert_idx, gate, bias, *geometry)
    assert y.dtype == torch.float16
    assert_close(y.float(), ref.float(), 2e-3, 2e-3, "int32 idx / fp32 gate")


@pytest.mark.parametrize("bad", [3, -1, 2**40], ids=["too_big", "negative", "huge"])
def test_bad_index_through_torch_ops_raises(bad):
    """The binding checks the indices on the device itself: a direct torch.ops call raises, and the CUDA
    context stays usable afterwards (no illegal address)."""
    case = CASES["basic"]
    x, weight, expert_idx, gate, bias = make_inputs(case, torch.float32, device="cuda")
    expert_idx = expert_idx.clone()
    expert_idx[1, 0] = bad
    args = (case.experts, list(case.stride), list(case.padding), list(case.dilation))
    with pytest.raises((ValueError, RuntimeError), match="expert_idx"):
        torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd(x, weight, expert_idx, gate, bias, *args)
    grad_out = torch.ones(case.batch, case.width, *case.size, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match="expert_idx"):
        torch.ops.moe_kernels_C.sparse_moe_conv2d_bwd(
            grad_out, x, weight, expert_idx, gate, bias, *args, [True, True, True, True]
        )
    with pytest.raises(ValueError, match="expert_idx"):
        sparse_moe_conv2d(x, weight, expert_idx, case.experts, gate, bias, 1, 1, backend="cuda")
    torch.cuda.synchronize()
    good = make_inputs(case, torch.float32, device="cuda")
    assert torch.isfinite(_call(case, good, backend="cuda")).all()


@pytest.mark.parametrize(
    "change,match",
    [
        ({"num_experts": 2}, "multiple of num_experts"),
        ({"num_experts": 5000}, "num_experts"),
        ({"x": "cpu"}, "CUDA tensor"),
        ({"bias": "short"}, "bias"),
        ({"gate": "wrong_shape"}, "gate"),
        ({"stride": [0, 1]}, "stride"),
        ({"padding": [-1, 0]}, "padding"),
    ],
)
def test_binding_validates_arguments(change, match):
    case = CASES["basic"]
    x, weight, expert_idx, gate, bias = _detached(make_inputs(case, device="cuda"))
    kw = {"num_experts": case.experts, "stride": [1, 1], "padding": [1, 1]}
    if change.get("x") == "cpu":
        x = x.cpu()  # the other tensors stay on the GPU, so the call still dispatches to the CUDA kernel
    if change.get("bias") == "short":
        bias = bias[:-1]
    if change.get("gate") == "wrong_shape":
        gate = gate[:, None, :]
    kw.update({k: v for k, v in change.items() if k in kw})
    with pytest.raises((ValueError, TypeError, RuntimeError, NotImplementedError), match=match):
        torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd(
            x, weight, expert_idx, gate, bias, kw["num_experts"], kw["stride"], kw["padding"], [1, 1]
        )


def test_wrong_grad_out_shape_raises():
    case = CASES["basic"]
    x, weight, expert_idx, gate, bias = make_inputs(case, device="cuda")
    grad_out = torch.ones(case.batch, case.width + 1, *case.size, device="cuda")
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.moe_kernels_C.sparse_moe_conv2d_bwd(
            grad_out, x, weight, expert_idx, gate, bias, case.experts, [1, 1], [1, 1], [1, 1], [True, True, True, True]
        )


def test_opcheck():
    case = CASES["k2_of_4"]
    args = custom_op_args(case, make_inputs(case, torch.float64, device="cuda"), "cuda")
    torch.library.opcheck(torch.ops.moe_kernels.sparse_moe_conv2d.default, args)


def test_fused_relu_and_compile():
    case = CASES["k2_of_4"]
    inputs = make_inputs(case, torch.float32, device="cuda")
    x, weight, expert_idx, gate, bias = _detached(inputs)

    def fn(x):
        return sparse_moe_conv2d(
            x, weight, expert_idx, case.experts, gate, bias, 1, 1, backend="cuda", activation="relu"
        )

    expected = torch.relu(_call(case, (x, weight, expert_idx, gate, bias), backend="reference"))
    assert_close(fn(x).cpu(), expected.cpu(), 1e-4, 1e-4, "relu")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # traces the op and its fake kernel
    assert_close(compiled(x).cpu(), expected.cpu(), 1e-4, 1e-4, "compiled relu")
