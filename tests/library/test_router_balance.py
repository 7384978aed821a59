"""Routers start balanced: standardised router inputs, research-code initialisation, neutral for imports."""

from __future__ import annotations

import math

import pytest
import torch

from advmoe.data import build_dataset
from advmoe.models import create_model, list_models
from advmoe.nn import PerLayerRouter, ResearchRouter, forward_with_aux
from advmoe.nn.routers import RouterInputNorm


@pytest.fixture(scope="module")
def digits_batch():
    data = build_dataset("digits", split="test", size=32, channels=3)
    return torch.stack([data[i][0] for i in range(64)])


_WIDE = ("wrn_28_10_cifar", "wrn_34_10_cifar", "resnet50_cifar", "resnet50_imagenet")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _WIDE else n for n in list_models()])
@pytest.mark.parametrize("router", ["research", "per_layer", "image"])
def test_no_layer_sends_90_percent_to_one_expert_at_init(name, router, digits_batch):
    """Every zoo model, both router kinds, 3 seeds, eval and train mode: no MoE layer >= 90% on one expert."""
    for seed in range(3):
        torch.manual_seed(seed)
        model = create_model(name, num_experts=2, ratio=0.25, router=router)
        for train in (False, True):
            model.train(train)
            with torch.no_grad():
                _, aux = forward_with_aux(model, digits_batch)
            assert aux.routing, "no MoE layer recorded a routing decision"
            for layer, idx in aux.routing.items():
                top_share = torch.bincount(idx.reshape(-1), minlength=2).max().item() / idx.numel()
                assert top_share < 0.9, f"{name} {router} seed {seed} train={train}: {layer} sends {top_share:.0%}"


def test_without_router_norm_the_zoo_collapses(digits_batch):
    """The failure the standardisation removes: the research router without it routes >= 90% one way."""
    torch.manual_seed(0)
    model = create_model("resnet18_cifar", num_experts=2, ratio=0.25, router="per_layer", router_norm=False).eval()
    with torch.no_grad():
        _, aux = forward_with_aux(model, digits_batch)
    shares = [torch.bincount(i.reshape(-1), minlength=2).max().item() / i.numel() for i in aux.routing.values()]
    assert max(shares) >= 0.9


def test_router_input_norm_train_eval_and_untracked_fallback():
    norm = RouterInputNorm(3)
    z = torch.randn(8, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([10.0, -2.0, 3.0])
    norm.eval()  # never trained: the batch's own statistics
    expected = _per_image((z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + norm.eps), norm.eps)
    torch.testing.assert_close(norm(z), expected)
    assert norm.num_batches_tracked.item() == 0 and torch.equal(norm.running_mean, torch.zeros(3))
    norm.train()
    torch.testing.assert_close(norm(z), expected)
    torch.testing.assert_close(norm.running_mean, 0.1 * z.mean(0))
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * z.var(0, unbiased=True))
    assert norm.num_batches_tracked.item() == 1
    one = torch.randn(1, 3)  # a single sample in train mode: running statistics, unchanged
    standard = (one - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
    torch.testing.assert_close(norm(one), _per_image(standard, norm.eps))
    assert norm.num_batches_tracked.item() == 1
    norm.eval()  # tracked: running statistics, per sample (batch-independent)
    torch.testing.assert_close(norm(z[:1]), norm(z)[:1])
    with pytest.raises(ValueError, match="RouterInputNorm"):
        norm(torch.randn(2, 4))


def _per_image(z, eps):
    z = z - z.mean(1, keepdim=True)
    return z / torch.sqrt((z**2).mean(1, keepdim=True) + eps)


def test_routers_keep_default_init_and_per_layer_bias_is_zero():
    """Zoo init leaves routers alone (research code): conv weights stay within kaiming-uniform(a=sqrt 5)."""
    torch.manual_seed(0)
    model = create_model("resnet18_cifar", num_experts=2, ratio=0.25, router="research")
    for conv in (model.router.conv1, model.router.layer3[0].conv2):
        fan_in = conv.weight[0].numel()
        assert conv.weight.abs().max().item() <= 1 / math.sqrt(fan_in) + 1e-7
    assert model.router.fc.weight.abs().max().item() <= 1 / math.sqrt(64) + 1e-7
    router = PerLayerRouter(7, 3)
    assert torch.equal(router.fc.bias, torch.zeros(3))


def test_image_router_is_cheap_model_level_and_learns_a_split():
    from advmoe.bench.models import flops_per_image
    from advmoe.nn import num_pathways
    from advmoe.nn.routers import ImageRouter

    router = ImageRouter(2)
    assert router(torch.rand(4, 3, 32, 32)).shape == (4, 2) and torch.equal(router.fc.bias, torch.zeros(2))
    model = create_model("resnet10_mini", num_experts=2, ratio=0.5, router="image")
    assert isinstance(model.router, ImageRouter) and num_pathways(model) == 2
    assert ImageRouter(2, input_norm=False).input_norm is None
    gflops = flops_per_image(router.eval(), torch.rand(1, 3, 32, 32))[0]
    assert 0.3e-3 < gflops < 0.5e-3  # about 0.4 MFLOPs (fvcore, one multiply-add = one FLOP)


def test_input_norm_off_is_the_research_router():
    torch.manual_seed(0)
    plain = ResearchRouter(2, input_norm=False)
    normed = ResearchRouter(2)
    assert plain.input_norm is None and not any(k.startswith("input_norm") for k in plain.state_dict())
    assert {k for k in normed.state_dict() if k.startswith("input_norm")} == {
        "input_norm.running_mean",
        "input_norm.running_var",
        "input_norm.num_batches_tracked",
    }
    x = torch.rand(4, 3, 16, 16)
    plain.eval()
    out = torch.nn.functional.adaptive_avg_pool2d(
        plain.layer3(plain.layer2(plain.layer1(torch.relu(plain.bn1(plain.conv1(x)))))), 1
    ).flatten(1)
    torch.testing.assert_close(plain(x), plain.fc(out))
    model = create_model("resnet10_mini", num_experts=2, ratio=0.5, router="per_layer", router_norm=False)
    assert model.config["router_norm"] is False
    assert all(m.input_norm is None for m in model.modules() if isinstance(m, PerLayerRouter))
    with pytest.raises(ValueError, match="router_norm"):
        create_model("resnet10_mini", num_experts=2, router_norm="yes")


def test_router_norm_survives_export():
    """The untracked fallback is a tensor ``where``: one graph, exportable."""
    router = PerLayerRouter(4, 2).eval()
    exported = torch.export.export(router, (torch.randn(3, 4, 5, 5),))
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(exported.module()(x), router(x))
