"""Triton-specific checks of the ``triton`` backend, beyond tests/kernels/test_op_backends.py.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py): the backend
functions are compared with the reference forward and explicit backward in fp64, on the cases the
shared suite leaves out, with tiny blocks (many tiles, column blocks and K steps), for every subset of
requested gradients, and with skewed routing. The ``cuda`` tests (GPU only) apply the low-precision
rule at realistic sizes and check that forward and backward never synchronise with the host.
"""

import dataclasses

import pytest
import torch
from helpers.op_cases import CASES, GRAD_SUBSETS, Case, assert_close, make_inputs

from moe_kernels import reference, sparse_moe_conv2d, sparse_moe_conv2d_ref
from moe_kernels._triton import tuning
from moe_kernels.backends.errors import BackendUnavailable
from moe_kernels.call import ConvCall
from moe_kernels.reference import sparse_moe_conv2d_backward_ref

triton_conv = pytest.importorskip("moe_kernels.backends.triton")
ALL_NEEDS = (True, True, True, True)


def _compare(case: Case, expert_idx=None, needs=ALL_NEEDS, grad_layout=None, tol=1e-10, dtype=torch.float64):
    """Backend forward and backward against the reference on one case; returns nothing, asserts."""
    x, weight, idx, gate, bias = (t.detach() if t is not None else None for t in make_inputs(case, dtype))
    idx = idx if expert_idx is None else expert_idx
    args = (x, weight, idx, case.experts, gate, bias, case.stride, case.padding, case.dilation)
    out = triton_conv.forward(ConvCall(*args))
    expected = sparse_moe_conv2d_ref(*args)
    assert out.dtype == x.dtype
    assert_close(out, expected, tol, tol, "forward")
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    if grad_layout == "channels_last":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    elif grad_layout == "transposed":
        grad_out = grad_out.transpose(2, 3).contiguous().transpose(2, 3)
    got = triton_conv.backward(grad_out, ConvCall(*args), needs)
    want = sparse_moe_conv2d_backward_ref(grad_out, *args, needs)
    for name, g, w, need in zip(("x", "weight", "bias", "gate"), got, want, needs, strict=True):
        if w is None:
            assert g is None or not need, f"grad {name}: expected None"
            continue
        assert g is not None, f"grad {name} missing"
        assert_close(g, w, tol * 10, tol * 10, f"grad {name}")


@pytest.fixture
def tiny_blocks(monkeypatch):
    """16x16x32 blocks, 3 persistent programs and 8 weight-gradient chunks: many tiles per expert."""
    blocks = {"block_m": 16, "block_n": 16, "block_k": 32, "programs": 3, "wgrad_chunks": 8, "channel_pad": 16}
    monkeypatch.setattr(tuning, "INTERPRETER_CONFIG", blocks)


EXTRA_CASES = {
    "non_contiguous": CASES["non_contiguous"],
    "k_equals_e": CASES["k_equals_e"],
    "rect_kernel": CASES["rect_kernel"],
    "batch1": CASES["batch1"],
    "one_expert": CASES["one_expert"],
    "stride2_dilation2": Case(stride=(2, 3), dilation=(2, 2), padding=(1, 2), size=(10, 11), kernel=(3, 2)),
    "kernel_5_pad0": Case(kernel=(5, 5), padding=(0, 0), size=(9, 8), top_k=2, experts=4, batch=2),
}


@pytest.mark.parametrize("case_name", list(EXTRA_CASES))
def test_extra_cases_fp64(case_name):
    _compare(EXTRA_CASES[case_name])


def test_many_tiles_blocks_and_k_steps(tiny_blocks):
    # 19 > 16 output channels, 17 > 16 input channels, K = 153 / 171, 18 output / 30 input pixels per
    # slot: several blocks on every axis, tiles that span slots and slots that span tiles.
    case = Case(batch=3, c_in=17, width=19, experts=3, top_k=2, size=(5, 6), stride=(2, 1))
    _compare(case)


def test_channels_last_output_and_fp32(tiny_blocks):
    case = dataclasses.replace(CASES["channels_last"], c_in=18)
    x, weight, idx, gate, bias = (t.detach() if t is not None else None for t in make_inputs(case, torch.float32))
    out = triton_conv.forward(
        ConvCall(x, weight, idx, case.experts, gate, bias, case.stride, case.padding, case.dilation)
    )
    assert out.is_contiguous(memory_format=torch.channels_last)
    _compare(case, tol=1e-5, dtype=torch.float32)


@pytest.mark.parametrize("needs", list(GRAD_SUBSETS.values()), ids=list(GRAD_SUBSETS))
def test_gradient_subsets(needs):
    _compare(Case(top_k=2, experts=3, batch=3), needs=needs)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_grad_out_any_strides(layout):
    _compare(Case(top_k=2, experts=3, batch=2, c_in=4), grad_layout=layout)


def test_all_slots_on_one_expert(tiny_blocks):
    # Skewed routing: one expert takes every slot, the others none (the weight gradient's chunks
    # must still split that expert's rows).
    case = Case(batch=5, experts=4, width=5)
    _compare(case, expert_idx=torch.full((5, 1), 2, dtype=torch.int64))


def test_same_expert_twice_in_a_sample():
    # Not what a top-k router produces, but the op's contract allows it: both slots get the expert.
    case = Case(batch=3, experts=2, top_k=2)
    _compare(case, expert_idx=torch.tensor([[1, 1], [0, 1], [0, 0]]))


def test_batch0_backward_shapes():
    case = CASES["batch0"]
    x, weight, idx, gate, bias = (t.detach() if t is not None else None for t in make_inputs(case))
    args = (x, weight, idx, case.experts, gate, bias, case.stride, case.padding, case.dilation)
    out = triton_conv.forward(ConvCall(*args))
    assert out.shape == (0, case.width, *case.size)
    gx, gw, gb, gg = triton_conv.backward(out, ConvCall(*args), ALL_NEEDS)
    assert gx.shape == x.shape and gg.shape == (0, 1)
    assert gw.shape == weight.shape and not gw.any() and not gb.any()


def test_through_the_op_with_relu_and_autograd():
    case = Case(top_k=2, experts=4, batch=3)
    x, weight, idx, gate, bias = make_inputs(case, torch.float64)
    out = sparse_moe_conv2d(x, weight, idx, case.experts, gate, bias, 1, 1, backend="triton", activation="relu")
    out.square().sum().backward()
    rx, rw, _, rg, rb = make_inputs(case, torch.float64)
    ref = torch.relu(sparse_moe_conv2d_ref(rx, rw, idx, case.experts, rg, rb, (1, 1), (1, 1), (1, 1)))
    ref.square().sum().backward()
    assert_close(out, ref, 1e-10, 1e-10, "forward")
    for name, a, b in (("x", x, rx), ("weight", weight, rw), ("gate", gate, rg), ("bias", bias, rb)):
        assert_close(a.grad, b.grad, 1e-9, 1e-9, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_dtypes_in_the_interpreter(dtype):
    """fp16/bf16 plumbing (loads, fp32 buffers, casts back): error vs an fp32 reference <= 2x plain PyTorch's."""
    case = Case(top_k=2, experts=3, batch=3, c_in=6, width=5)
    inputs32 = [t.detach() if t is not None else None for t in make_inputs(case, torch.float32)]
    low = [t.detach() if t is not None else None for t in make_inputs(case, dtype)]
    extra = (case.stride, case.padding, case.dilation)
    expected = sparse_moe_conv2d_ref(*inputs32[:3], case.experts, *inputs32[3:], *extra)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    results = {}
    call = ConvCall(*low[:3], case.experts, *low[3:], *extra)
    for name, fwd, bwd in (
        ("triton", triton_conv.forward, triton_conv.backward),
        ("torch", reference.forward, reference.backward),
    ):
        out = fwd(call)
        assert out.dtype == dtype
        grads = bwd(grad_out.to(dtype), call, ALL_NEEDS)
        results[name] = (out, *grads)
    want = (
        expected,
        *sparse_moe_conv2d_backward_ref(grad_out, *inputs32[:3], case.experts, *inputs32[3:], *extra, ALL_NEEDS),
    )
    for what, got, base, ref in zip(
        ("forward", "x", "weight", "bias", "gate"), results["triton"], results["torch"], want, strict=True
    ):
        assert got.dtype == dtype, what
        err = (got.float() - ref).abs().max().item()
        base_err = (base.float() - ref).abs().max().item()
        assert err <= 2 * base_err + 1e-3, f"{what}: max err {err:.3e} vs plain PyTorch {base_err:.3e}"


def test_load_returns_the_backend_functions():
    assert triton_conv.load() == (triton_conv.forward, triton_conv.backward)


def test_load_without_gpu_or_interpreter_says_how(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        triton_conv.load()


# ---------------------------------------------------------------- GPU only


def _gpu_case_inputs(batch, c_in, width, experts, top_k, size, dtype, channels_last=False, seed=0):
    case = Case(
        batch=batch, c_in=c_in, width=width, experts=experts, top_k=top_k, size=size, channels_last=channels_last
    )
    return case, make_inputs(case, dtype, device="cuda", seed=seed)


def _run_op(case, inputs, backend):
    x, weight, idx, gate, bias = inputs
    return sparse_moe_conv2d(
        x, weight, idx, case.experts, gate, bias, case.stride, case.padding, case.dilation, backend=backend
    )


def _grads(out, inputs):
    grad_out = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(1), device=out.device)
    tensors = [inputs[i] for i in (0, 1, 3, 4)]
    return torch.autograd.grad(out, tensors, grad_out.to(out.dtype))


GPU_SHAPES = {
    "b64_64to64_32x32": dict(batch=64, c_in=64, width=64, experts=2, top_k=1, size=(32, 32)),
    "b256_64to64_32x32": dict(batch=256, c_in=64, width=64, experts=2, top_k=1, size=(32, 32)),
    "b32_k2of4_odd": dict(batch=32, c_in=35, width=40, experts=4, top_k=2, size=(15, 17)),
}


@pytest.mark.cuda
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gpu_error_rule(shape, dtype, monkeypatch):
    """Error against a higher-precision reference <= 2x that of plain PyTorch in the same dtype.

    fp32 runs with TF32 off on both sides (cuDNN may pick a non-TF32 algorithm for some convolutions,
    which would make the baseline unfairly exact); the TF32 path is checked by test_gpu_fp32_tf32.
    """
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    high = torch.float64 if dtype == torch.float32 else torch.float32
    case, inputs = _gpu_case_inputs(**GPU_SHAPES[shape], dtype=dtype, channels_last=shape.startswith("b64"))
    _, ref_inputs = _gpu_case_inputs(**GPU_SHAPES[shape], dtype=high)
    _, base_inputs = _gpu_case_inputs(**GPU_SHAPES[shape], dtype=dtype)
    out = _run_op(case, inputs, "triton")
    expected = _run_op(case, ref_inputs, "reference")
    baseline = _run_op(case, base_inputs, "reference")
    err = (out.to(high) - expected).abs().max().item()
    base_err = (baseline.to(high) - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= 2 * base_err + 1e-5 * scale, f"forward: max err {err:.3e} vs plain PyTorch {base_err:.3e}"
    names = ("x", "weight", "gate", "bias")
    for name, got, want, base in zip(
        names, _grads(out, inputs), _grads(expected, ref_inputs), _grads(baseline, base_inputs), strict=True
    ):
        err = (got.to(high) - want).abs().max().item()
        base_err = (base.to(high) - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= 2 * base_err + 1e-5 * scale, f"grad {name}: max err {err:.3e} vs plain PyTorch {base_err:.3e}"


@pytest.mark.cuda
def test_gpu_fp32_tf32(monkeypatch):
    """With TF32 allowed (PyTorch's default for convolutions) fp32 stays within TF32 accuracy."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    case, inputs = _gpu_case_inputs(**GPU_SHAPES["b64_64to64_32x32"], dtype=torch.float32)
    _, ref_inputs = _gpu_case_inputs(**GPU_SHAPES["b64_64to64_32x32"], dtype=torch.float64)
    out = _run_op(case, inputs, "triton")
    expected = _run_op(case, ref_inputs, "reference")
    assert_close(out, expected, 2e-2, 2e-2, "forward (tf32)")
    for name, got, want in zip(
        ("x", "weight", "gate", "bias"), _grads(out, inputs), _grads(expected, ref_inputs), strict=True
    ):
        rel = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert rel < 5e-3, f"grad {name} (tf32): max error {rel:.2e} of the largest value"


@pytest.mark.cuda
def test_gpu_no_host_sync():
    case, inputs = _gpu_case_inputs(**GPU_SHAPES["b32_k2of4_odd"], dtype=torch.bfloat16)
    x, weight, idx, gate, bias = (t.detach() for t in inputs)
    args = (x, weight, idx, case.experts, gate, bias, case.stride, case.padding, case.dilation)
    out = triton_conv.forward(ConvCall(*args))  # compile outside the checked region
    triton_conv.backward(torch.ones_like(out), ConvCall(*args), ALL_NEEDS)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = triton_conv.forward(ConvCall(*args))
        triton_conv.backward(torch.ones_like(out), ConvCall(*args), ALL_NEEDS)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
