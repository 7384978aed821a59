"""sparse_moe_conv2d inside a small module under torch.compile and torch.export, against eager."""

import os

import pytest
import torch
from torch import nn

import moe_kernels
from moe_kernels import sparse_moe_conv2d

BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(b not in moe_kernels.available_backends(), reason=f"{b} not built"))
    for b in ("reference", "cpu")
]


class TinyMoE(nn.Module):
    """Per-layer router (GAP + linear, top-1, straight-through gate) around one sparse MoE conv."""

    def __init__(self, backend: str, c_in=3, width=4, experts=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(experts * width, c_in, 3, 3, generator=g) * 0.3)
        self.bias = nn.Parameter(torch.randn(experts * width, generator=g) * 0.1)
        self.router = nn.Linear(c_in, experts)
        self.experts = experts
        self.backend = backend

    def forward(self, x):
        scores = self.router(x.mean((2, 3))).softmax(-1)
        top, expert_idx = scores.max(-1, keepdim=True)
        gate = top - top.detach() + 1.0  # value 1, router gradient backward
        y = sparse_moe_conv2d(
            x, self.weight, expert_idx, self.experts, gate, self.bias, padding=1, backend=self.backend
        )
        return torch.relu(y).sum((2, 3))


def _inputs():
    return torch.randn(5, 3, 7, 6, generator=torch.Generator().manual_seed(1))


def _fwd_bwd(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    return out.detach(), grads


def _assert_same(got, want, what):
    out_g, grads_g = got
    out_w, grads_w = want
    torch.testing.assert_close(out_g, out_w, atol=1e-5, rtol=1e-5, msg=f"{what}: forward differs")
    for i, (a, b) in enumerate(zip(grads_g, grads_w, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{what}: gradient {i} differs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_aot_eager_matches_eager(backend):
    torch._dynamo.reset()
    model, x = TinyMoE(backend), _inputs()
    want = _fwd_bwd(model, x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _assert_same(_fwd_bwd(compiled, x), want, f"aot_eager/{backend}")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ADVMOE_SKIP_INDUCTOR") == "1", reason="ADVMOE_SKIP_INDUCTOR=1")
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_inductor_matches_eager(backend):
    torch._dynamo.reset()
    model, x = TinyMoE(backend), _inputs()
    want = _fwd_bwd(model, x)
    compiled = torch.compile(model, fullgraph=True)
    _assert_same(_fwd_bwd(compiled, x), want, f"inductor/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_matches_eager(backend):
    model, x = TinyMoE(backend).eval(), _inputs()
    exported = torch.export.export(model, (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("moe_kernels.sparse_moe_conv2d" in op for op in ops), f"op missing from the exported graph: {ops}"
    x2 = torch.randn(5, 3, 7, 6)
    torch.testing.assert_close(exported.module()(x2), model(x2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_dynamic_batch(backend):
    model = TinyMoE(backend).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (_inputs(),), dynamic_shapes=({0: batch},))
    for b in (1, 9):
        x = torch.randn(b, 3, 7, 6)
        torch.testing.assert_close(exported.module()(x), model(x), atol=1e-5, rtol=1e-5)
