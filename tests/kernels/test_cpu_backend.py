"""Paths specific to the C++ CPU backend: concurrent chunks (k = 1, many samples), serial chunks (k > 1),
duplicate experts in one sample, unbalanced routing, int32 indices, zero gates, thread-count invariance."""

import pytest
import torch
from helpers.op_cases import assert_close

import moe_kernels
from moe_kernels import sparse_moe_conv2d, sparse_moe_conv2d_ref
from moe_kernels.call import ConvCall

pytestmark = pytest.mark.skipif(
    "cpu" not in moe_kernels.available_backends(),
    reason=f"cpu backend missing: {moe_kernels.unavailable_reason('cpu')}",
)


def _inputs(batch, top_k, experts=3, c_in=6, width=5, size=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, size, size + 1, generator=g, dtype=dtype)
    weight = torch.randn(experts * width, c_in, 3, 3, generator=g, dtype=dtype) / c_in**0.5
    bias = torch.randn(experts * width, generator=g, dtype=dtype)
    gate = torch.rand(batch, top_k, generator=g, dtype=dtype) + 0.5
    expert_idx = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(batch)])
    return x, weight, expert_idx, gate, bias


def _compare(x, weight, expert_idx, experts, gate, bias, stride=1, padding=1, tol=1e-10):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, gate, bias)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, weight, gate, bias)]
    out = sparse_moe_conv2d(
        leaves[0], leaves[1], expert_idx, experts, leaves[2], leaves[3], stride, padding, backend="cpu"
    )
    want = sparse_moe_conv2d_ref(
        ref_leaves[0],
        ref_leaves[1],
        expert_idx,
        experts,
        ref_leaves[2],
        ref_leaves[3],
        (stride, stride),
        (padding, padding),
    )
    assert_close(out, want, tol, tol, "forward")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    got = torch.autograd.grad(out, leaves, grad)
    exp = torch.autograd.grad(want, ref_leaves, grad)
    for name, a, b in zip(("x", "weight", "gate", "bias"), got, exp, strict=True):
        assert_close(a, b, tol * 10, tol * 10, f"grad {name}")
    return out, got


@pytest.mark.parametrize("batch,top_k", [(23, 1), (23, 2), (40, 3)])
def test_many_chunks(batch, top_k):
    x, weight, expert_idx, gate, bias = _inputs(batch, top_k)
    _compare(x, weight, expert_idx, 3, gate, bias)


def test_unbalanced_routing_and_int32_indices():
    x, weight, _, gate, bias = _inputs(17, 1)
    expert_idx = torch.zeros(17, 1, dtype=torch.int32)
    expert_idx[3] = 2
    _compare(x, weight, expert_idx, 3, gate, bias)


def test_duplicate_expert_in_one_sample():
    x, weight, _, _, bias = _inputs(6, 2)
    expert_idx = torch.tensor([[1, 1], [0, 2], [2, 2], [0, 0], [1, 0], [2, 1]])
    gate = torch.rand(6, 2, dtype=torch.float64) + 0.5
    _compare(x, weight, expert_idx, 3, gate, bias)


def test_zero_gates_still_give_gate_gradient():
    x, weight, expert_idx, gate, bias = _inputs(9, 2)
    gate = gate.clone()
    gate[::2] = 0.0
    _, grads = _compare(x, weight, expert_idx, 3, gate, bias)
    assert torch.count_nonzero(grads[2][::2]) > 0, "a zero gate must still get a gradient"


def test_stride2_many_samples_channels_last():
    x, weight, expert_idx, gate, bias = _inputs(19, 1, size=12)
    _compare(x.contiguous(memory_format=torch.channels_last), weight, expert_idx, 3, gate, bias, stride=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_same_result_for_one_and_two_threads(dtype):
    """The concurrent schedule (2 threads) and the serial one (1 thread) agree (the chunk sizes differ,
    so only up to rounding)."""
    x, weight, expert_idx, gate, bias = _inputs(32, 1, dtype=dtype)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.detach().clone().requires_grad_() for t in (x, weight, gate, bias)]
            out = sparse_moe_conv2d(leaves[0], leaves[1], expert_idx, 3, leaves[2], leaves[3], 1, 1, backend="cpu")
            out.square().sum().backward()
            results.append([out.detach()] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(before)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_non_contiguous_grad_out():
    x, weight, expert_idx, gate, bias = _inputs(11, 2)
    out = sparse_moe_conv2d(x, weight, expert_idx, 3, gate, bias, 1, 1, backend="cpu")
    g = torch.randn(out.shape[0], out.shape[1], out.shape[3], out.shape[2], dtype=out.dtype).transpose(2, 3)
    fwd, bwd = moe_kernels.backends.get_backend("cpu")
    ref_fwd, ref_bwd = moe_kernels.backends.get_backend("reference")
    call, needs = ConvCall(x, weight, expert_idx, 3, gate, bias, (1, 1), (1, 1), (1, 1)), (True, True, True, True)
    for a, b in zip(bwd(g, call, needs), ref_bwd(g.contiguous(), call, needs), strict=True):
        assert_close(a, b, 1e-9, 1e-9, "backward with a transposed grad_out")
