"""FLOP counting: the issue's reference figures, the sparse-op handle, reporting of unpriced ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advmoe.flops import count_flops, flop_breakdown
from advmoe.models import create_model
from advmoe.nn import SparseMoEConv2d

# GFLOPs per 32x32 image (fvcore, 1 multiply-add = 1 FLOP), r = 0.5, E = 2, research router.
EXPECTED = [
    ("resnet18_cifar", None, 1.0, 0.557),
    ("resnet18_cifar", 2, 0.5, 0.193),
    ("vgg16_bn", None, 1.0, 0.314),
    ("vgg16_bn", 2, 0.5, 0.120),
    ("wrn_28_10_cifar", None, 1.0, 5.248),
    ("wrn_28_10_cifar", 2, 0.5, 1.354),
]


@pytest.mark.parametrize("name, num_experts, ratio, gflops", EXPECTED)
def test_reference_figures(name, num_experts, ratio, gflops):
    model = create_model(name, num_experts=num_experts, ratio=ratio, backend="reference")
    per_image = count_flops(model, torch.rand(1, 3, 32, 32)) / 1e9
    assert per_image == pytest.approx(gflops, rel=0.01)


def test_moe_handle_counts_active_channels_and_scales_with_batch():
    layer = SparseMoEConv2d(6, 8, 3, stride=2, padding=1, num_experts=4, top_k=2, backend="reference")
    layer.frozen_expert_idx = 0
    x = torch.rand(3, 6, 9, 9)
    report = flop_breakdown(layer, x)
    # output (3, 8, 5, 5); each output element costs C_in * kh * kw multiply-adds
    assert report.total == 3 * 8 * 5 * 5 * 6 * 3 * 3
    assert report.per_image == report.total / 3 and report.unsupported == {}
    assert report.by_operator == {"sparse_moe_conv2d": report.total}


def test_router_is_counted_and_moe_is_cheaper_than_masked_width():
    moe = create_model("resnet10_mini", num_experts=2, ratio=0.5, backend="reference")
    report = flop_breakdown(moe, torch.rand(2, 3, 32, 32))
    router = sum(v for k, v in report.by_module.items() if k == "router")
    assert router > 0
    dense_full = count_flops(create_model("resnet10_mini"), torch.rand(2, 3, 32, 32))
    assert report.total - router < dense_full / 2


def test_counting_restores_mode_and_usage_tracking():
    model = create_model("resnet10_mini", num_experts=2, backend="reference").train()
    count_flops(model, torch.rand(1, 3, 16, 16))
    assert model.training
    layers = [m for m in model.modules() if isinstance(m, SparseMoEConv2d)]
    assert all(m.track_usage and m.expert_counts.sum() == 0 for m in layers)


class _Odd(nn.Module):
    def forward(self, x):
        return torch.special.erfinv(x.clamp(-0.5, 0.5)).cumsum(1)


def test_unpriced_ops_are_reported():
    with pytest.warns(UserWarning, match="cannot price"):
        report = flop_breakdown(_Odd(), torch.rand(2, 4))
    assert "aten::special_erfinv" in report.unsupported or "aten::erfinv" in report.unsupported
    assert "aten::cumsum" in report.unsupported


def test_bad_inputs():
    with pytest.raises(ValueError, match="B >= 1"):
        count_flops(create_model("resnet10_mini"), torch.rand(0, 3, 8, 8))


def test_per_layer_router_model_prices_every_op():
    model = create_model("resnet10_mini", num_experts=2, ratio=0.5, router="per_layer", backend="reference")
    report = flop_breakdown(model, torch.rand(1, 3, 32, 32))
    assert report.unsupported == {}
    slim = count_flops(create_model("resnet10_mini", ratio=0.5), torch.rand(1, 3, 32, 32))
    assert slim < report.total < 1.5 * slim
