"""The straight-through gate's score (``gate_score``): same forward, bounded router gradient, stable training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advmoe.models import create_model
from advmoe.models.common import ModelSpec
from advmoe.nn import GATE_SCORES, SparseMoEConv2d
from advmoe.train.config import ModelConfig


def _per_layer_pair(seed: int = 0):
    torch.manual_seed(seed)
    soft = create_model("resnet10_mini", num_experts=2, ratio=0.5, router="per_layer", in_channels=1)
    hard = create_model(
        "resnet10_mini", num_experts=2, ratio=0.5, router="per_layer", in_channels=1, gate_score="logits"
    )
    hard.load_state_dict(soft.state_dict())
    return soft, hard


def test_gate_score_changes_gradients_not_outputs():
    soft, hard = _per_layer_pair()
    x = torch.rand(6, 1, 16, 16)
    y = torch.arange(6) % 10
    for m in (soft, hard):
        m.eval()
    out_soft, out_hard = soft(x), hard(x)
    torch.testing.assert_close(out_soft, out_hard, rtol=0, atol=0)
    F.cross_entropy(out_soft, y).backward()
    F.cross_entropy(out_hard, y).backward()
    router = "layer1.0.conv1.router.fc.weight"
    g_soft = dict(soft.named_parameters())[router].grad
    g_hard = dict(hard.named_parameters())[router].grad
    assert g_soft is not None and g_hard is not None
    assert not torch.allclose(g_soft, g_hard)


def test_softmax_gate_gradient_is_bounded_for_large_scores():
    torch.manual_seed(0)
    grads = {}
    for score in GATE_SCORES:
        layer = SparseMoEConv2d(4, 8, 3, padding=1, num_experts=2, router="per_layer", gate_score=score)
        with torch.no_grad():
            layer.router.fc.weight.mul_(1e4)  # scores far apart: softmax saturates, raw logits do not
        x = torch.rand(5, 4, 6, 6)
        layer(x).square().sum().backward()
        grads[score] = layer.router.fc.weight.grad.abs().max().item()
    assert grads["softmax"] < 1e-3 * grads["logits"], grads


def test_softmax_gate_keeps_per_layer_training_finite():
    """Regression: with the raw-logit gate this setup's gradient norm grew from ~3 to ~1e12 within 40 steps."""
    from advmoe.data import build_dataset

    data = build_dataset("digits", split="train", size=16, channels=1)
    x = torch.stack([data[i][0] for i in range(256)])
    y = torch.tensor([int(data[i][1]) for i in range(256)])
    torch.manual_seed(1)
    model = create_model("resnet10_mini", num_experts=2, ratio=0.5, router="per_layer", in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    norms = []
    for _ in range(40):
        i = torch.randint(0, 256, (32,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i]), y[i])
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
        assert torch.isfinite(loss), f"loss became {loss.item()} (grad norms so far {norms})"
        opt.step()
    assert max(norms) < 100.0, norms


def test_gate_score_is_recorded_and_imports_use_logits():
    model = create_model("resnet10_mini", num_experts=2, ratio=0.5, router="image", in_channels=1, gate_score="logits")
    assert model.config["gate_score"] == "logits" and model.gate_score == "logits"
    rebuilt = create_model(**model.config)
    assert rebuilt.gate_score == "logits"
    assert create_model("resnet10_mini", num_experts=2, router="per_layer").layer1[0].conv1.gate_score == "softmax"


@pytest.mark.parametrize(
    "build",
    [
        lambda: SparseMoEConv2d(4, 8, 3, num_experts=2, router="per_layer", gate_score="relu"),
        lambda: ModelSpec(num_experts=2, gate_score="relu"),
        lambda: create_model("resnet10_mini", num_experts=2, gate_score="relu"),
        lambda: ModelConfig(name="resnet10_mini", gate_score="relu"),
    ],
)
def test_unknown_gate_score_lists_the_known_ones(build):
    with pytest.raises(ValueError, match="softmax.*logits"):
        build()


def test_gate_gradient_context_switches_the_straight_through_term():
    from advmoe.nn import gate_gradient, top_k_routing

    logits = torch.randn(5, 3, requires_grad=True)
    assert top_k_routing(logits, 1).gate.requires_grad
    with gate_gradient(False):
        off = top_k_routing(logits, 2, score="logits")
        with gate_gradient(True):
            assert top_k_routing(logits, 1).gate.requires_grad  # nested contexts restore on exit
        assert not top_k_routing(logits, 1).gate.requires_grad
    assert not off.gate.requires_grad and off.gate.shape == (5, 2) and bool((off.gate == 1).all())
    assert top_k_routing(logits, 1).gate.requires_grad
    with pytest.raises(TypeError, match="enabled must be a bool"), gate_gradient(1):
        pass


@pytest.mark.parametrize("router", ["image", "per_layer"])
def test_attacks_follow_the_models_true_gradient(router):
    """Inside an attack the input gradient is the model's own (routing constant), not the estimator's."""
    from advmoe.attacks._common import frozen_params, input_grad
    from advmoe.nn import forward_with_aux, frozen_routing

    torch.manual_seed(0)
    model = create_model(
        "resnet10_mini", num_experts=2, ratio=0.5, router=router, in_channels=1, gate_score="logits"
    ).eval()
    x, y = torch.rand(6, 1, 16, 16), torch.arange(6) % 10

    def grad_of_loss(x_in):
        x_in = x_in.clone().requires_grad_(True)
        return input_grad(F.cross_entropy(model(x_in), y), x_in)

    with torch.no_grad():
        routing = forward_with_aux(model, x)[1].routing
    with torch.enable_grad():
        with frozen_routing(model, routing):
            true = grad_of_loss(x)  # routing held at the clean choice: the model's gradient at x
        with frozen_params(model):
            attack = grad_of_loss(x)
        with frozen_params(model, gate_gradient=True):
            estimator = grad_of_loss(x)
    torch.testing.assert_close(attack, true)
    assert not torch.allclose(estimator, true, atol=1e-6)
