"""SparseMoEConv2d against the masked full-convolution formulation (tests/helpers/masked_moe.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.masked_moe import StraightThroughOneHot, masked_moe_conv

from advmoe.nn import Routing, SparseMoEConv2d, top_k_routing

CASES = [
    # in, out, kernel, stride, padding, dilation, E, k, bias, B, H, W
    (3, 4, 3, 1, 1, 1, 2, 1, True, 5, 7, 9),
    (5, 6, 3, 2, 0, 1, 3, 2, False, 4, 9, 6),
    (4, 9, (3, 1), (1, 2), (1, 0), (2, 1), 3, 3, True, 3, 8, 7),
    (2, 3, 1, 1, 0, 1, 4, 1, True, 1, 5, 5),
]


def _layer(case, **kwargs):
    c_in, c_out, ksize, stride, padding, dilation, experts, k, bias = case[:9]
    torch.manual_seed(0)
    layer = SparseMoEConv2d(
        c_in,
        c_out,
        ksize,
        stride,
        padding,
        dilation,
        bias=bias,
        num_experts=experts,
        top_k=k,
        dtype=torch.float64,
        backend="reference",
        **kwargs,
    )
    if bias:
        layer.bias.data.normal_()
    return layer


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{c[6]}k{c[7]}")
def test_matches_masked_full_conv_forward_and_backward(case):
    layer = _layer(case)
    batch, h, w = case[9:]
    x = torch.randn(batch, layer.in_channels, h, w, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(batch, layer.num_experts, dtype=torch.float64, requires_grad=True)
    routing = top_k_routing(logits, layer.top_k)
    y = layer(x, routing)
    assert y.shape[1] == layer.out_channels
    expected = masked_moe_conv(
        x,
        layer.weight,
        layer.bias,
        routing.expert_idx,
        routing.gate,
        layer.num_experts,
        layer.stride,
        layer.padding,
        layer.dilation,
    )
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    params = [x, layer.weight, logits] + ([layer.bias] if layer.bias is not None else [])
    ours = torch.autograd.grad(y, params, grad, retain_graph=True)
    theirs = torch.autograd.grad(expected, params, grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_router_gradient_equals_research_straight_through_mask():
    """Top-1 gate gradient = the research GetMask (one-hot through a mask, straight-through)."""
    layer = _layer(CASES[0])
    x = torch.randn(6, 3, 7, 9, dtype=torch.float64)
    logits = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    y = layer(x, top_k_routing(logits, 1))
    (g_ours,) = torch.autograd.grad((y**2).sum(), logits)
    logits2 = logits.detach().clone().requires_grad_()
    mask = StraightThroughOneHot.apply(logits2).repeat_interleave(layer.expert_width, 1)
    full = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding) * mask[:, :, None, None]
    keep = full.reshape(-1, *full.shape[2:])[mask.reshape(-1) > 0].reshape(6, -1, *full.shape[2:])
    (g_research,) = torch.autograd.grad((keep**2).sum(), logits2)
    torch.testing.assert_close(g_ours, g_research)
    assert g_ours.abs().sum() > 0


def test_per_layer_router_learns_and_counts_usage():
    layer = SparseMoEConv2d(4, 6, 3, padding="same", num_experts=3, top_k=2, router="per_layer", backend="reference")
    x = torch.randn(8, 4, 6, 6)
    y = layer(x)
    assert y.shape == (8, 6, 6, 6)
    y.square().sum().backward()
    assert layer.router.fc.weight.grad.abs().sum() > 0
    assert layer.expert_counts.sum() == 16
    assert layer.expert_usage().sum().item() == pytest.approx(1.0)
    layer.reset_usage()
    assert layer.expert_counts.sum() == 0 and layer.expert_usage().sum() == 0


def test_frozen_expert_idx_and_padding_mode():
    layer = SparseMoEConv2d(3, 4, 3, padding=1, padding_mode="reflect", num_experts=2, backend="reference")
    x = torch.randn(3, 3, 5, 5)
    layer.frozen_expert_idx = 1
    y = layer(x)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), layer.weight[4:], layer.bias[4:])
    torch.testing.assert_close(y, expected)
    layer.frozen_expert_idx = torch.tensor([[0], [1], [0]])
    y = layer(x)
    torch.testing.assert_close(y[1], expected[1])
    layer.frozen_expert_idx = torch.tensor([[0], [1]])
    with pytest.raises(ValueError, match="frozen routing"):
        layer(x)


def test_empty_batch_and_expert_without_samples():
    layer = _layer(CASES[1])
    x = torch.randn(0, 5, 9, 6, dtype=torch.float64)
    routing = top_k_routing(torch.randn(0, 3, dtype=torch.float64), 2)
    assert layer(x, routing).shape == (0, 6, 4, 2)
    x = torch.randn(3, 5, 9, 6, dtype=torch.float64)
    routing = Routing(torch.tensor([[0, 1]] * 3), torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 3))
    y = layer(x, routing)
    expected = masked_moe_conv(x, layer.weight, None, routing.expert_idx, None, 3, layer.stride, layer.padding, (1, 1))
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": 2}, "groups"),
        ({"num_experts": 2, "top_k": 3}, "top_k"),
        ({"out_channels": 5, "top_k": 2}, "divide"),
        ({"router": "global"}, "router"),
        ({"num_experts": 0}, "num_experts"),
        ({"padding_mode": "mirror"}, "padding_mode"),
        ({"padding": -1}, "padding"),
        ({"stride": 2, "padding": "same"}, "same"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "num_experts": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        SparseMoEConv2d(**args)


def test_forward_errors():
    layer = SparseMoEConv2d(3, 4, 3, num_experts=2, backend="reference")
    with pytest.raises(RuntimeError, match="no router"):
        layer(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="expert_idx has shape"):
        layer(torch.randn(2, 3, 5, 5), top_k_routing(torch.randn(3, 2)))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        layer(torch.randn(3, 5, 5))


def test_auto_backend_matches_reference():
    torch.manual_seed(0)
    layer = SparseMoEConv2d(6, 8, 3, padding=1, num_experts=2, router="per_layer")
    x = torch.randn(5, 6, 9, 9)
    y = layer(x)
    layer.backend = "reference"
    torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-5)
