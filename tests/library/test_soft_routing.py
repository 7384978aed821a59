"""advmoe.attacks.soft_routing: the soft-gate surrogate of an MoE model that evaluation attacks end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advmoe.attacks import calibrated_temperatures, pgd, soft_routing
from advmoe.models import create_model
from advmoe.nn import Router, SparseMoEConv2d, forward_with_aux, frozen_routing, moe_layers


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _zoo(router: str, top_k: int) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(
        "resnet10_mini", num_classes=5, num_experts=3, ratio=0.5, top_k=top_k, router=router, in_channels=1
    )
    return model.eval()


@pytest.mark.parametrize("router", ["research", "per_layer"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_cold_soft_routing_is_the_hard_model_and_warm_is_not(router, top_k):
    model = _zoo(router, top_k)
    x = torch.rand(4, 1, 12, 12, generator=_gen(1))
    with torch.no_grad():
        hard, aux = forward_with_aux(model, x)
        with soft_routing(model, temperature=1e-4):  # sequential soft top-k -> the hard top-k slots
            cold, cold_aux = forward_with_aux(model, x)
        with soft_routing(model, temperature=1.0):
            warm = model(x)
    torch.testing.assert_close(cold, hard, atol=1e-5, rtol=1e-5)
    assert {k: v.tolist() for k, v in cold_aux.routing.items()} == {k: v.tolist() for k, v in aux.routing.items()}
    assert set(cold_aux.router_logits) == set(aux.router_logits)
    assert (warm - hard).abs().max() > 1e-4  # the mixture really mixes
    assert all("forward" not in layer.__dict__ for _, layer in moe_layers(model))


def test_top1_soft_output_is_the_softmax_weighted_sum_of_every_expert():
    torch.manual_seed(0)
    layer = SparseMoEConv2d(3, 4, 3, padding=1, padding_mode="reflect", num_experts=3, router="per_layer")
    model = nn.Sequential(layer).eval()
    x = torch.rand(5, 3, 6, 7, generator=_gen(2))
    with torch.no_grad():
        experts = []
        for e in range(3):
            with frozen_routing(model, e):
                experts.append(model(x))
        probs = torch.softmax(layer.router(x) / 0.7, dim=1)
        expected = sum(probs[:, e, None, None, None] * experts[e] for e in range(3))
        with soft_routing(model, temperature=0.7):
            got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_soft_routing_is_differentiable_through_the_router_and_restores_the_layers():
    model = _zoo("per_layer", 1)
    x = torch.rand(3, 1, 12, 12, generator=_gen(3))
    layers = [layer for _, layer in moe_layers(model)]
    counts = [layer.expert_counts.clone() for layer in layers]
    with pytest.raises(RuntimeError, match="boom"), soft_routing(model):
        loss = model(x).logsumexp(dim=1).sum()
        loss.backward()
        raise RuntimeError("boom")  # an exception inside still restores every layer
    router_grads = [layer.router.fc.weight.grad for layer in layers]
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads)
    assert all("forward" not in layer.__dict__ and layer.track_usage for layer in layers)
    assert all(torch.equal(c, layer.expert_counts) for c, layer in zip(counts, layers, strict=True))
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), frozen_routing(model, 1):  # frozen routing inside soft routing stays hard (gate 1)
        hard = model(x)
        with soft_routing(model):
            assert torch.equal(model(x), hard)


def test_pgd_on_the_surrogate_returns_points_in_the_ball():
    model = _zoo("research", 1)
    x = torch.rand(4, 1, 12, 12, generator=_gen(4))
    y = torch.arange(4)
    with soft_routing(model):
        x_adv = pgd(model, x, y, eps=0.05, alpha=0.02, steps=3, generator=_gen())
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6 and not x_adv.requires_grad
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_temperature_and_dense_models_are_refused(temperature):
    model = _zoo("per_layer", 1)
    with pytest.raises(ValueError, match="temperature"), soft_routing(model, temperature=temperature):
        pass
    with pytest.raises(ValueError, match="SparseMoEConv2d"), soft_routing(nn.Linear(2, 2)):
        pass


class _MeanRouter(Router):
    """Scores [0, c * mean(x)]: the gap between the two scores is c * |mean(x)|."""

    def __init__(self, c):
        super().__init__()
        self.num_experts, self.c = 2, c

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), self.c * m], dim=1)


def test_calibrated_temperatures_follow_each_layers_median_score_gap():
    first = SparseMoEConv2d(1, 2, 1, num_experts=2, router=_MeanRouter(2.0), bias=False)
    second = SparseMoEConv2d(2, 2, 1, num_experts=2, router=_MeanRouter(0.0))  # gaps all 0
    with torch.no_grad():
        first.weight.fill_(1.0)
    model = nn.Sequential(first, second).eval()
    x = torch.tensor([0.1, 0.2, 0.4])[:, None, None, None].expand(3, 1, 2, 2).contiguous()
    temps = calibrated_temperatures(model, x, relative=0.5)
    assert temps == {"0": pytest.approx(0.5 * 2.0 * 0.2), "1": pytest.approx(0.5)}  # median gap 0.4; 0 -> relative
    assert all("forward" not in m.__dict__ and m.track_usage for m in (first, second))
    with torch.no_grad():
        with soft_routing(model, {"0": 0.3, "1": 0.3}):
            per_layer = model(x)
        with soft_routing(model, 0.3):
            assert torch.equal(model(x), per_layer)
    with pytest.raises(ValueError, match="no entry for MoE layer"), soft_routing(model, {"0": 0.3}):
        pass
    with pytest.raises(ValueError, match="relative"):
        calibrated_temperatures(model, x, relative=0.0)
