"""Routers, top-k routing with the straight-through gate, load balancing."""

from __future__ import annotations

import pytest
import torch

from advmoe.nn import PerLayerRouter, ResearchRouter, load_balance_loss, top_k_routing

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def test_research_router_state_dict_names_match_the_research_code():
    router = ResearchRouter(num_experts=3, input_norm=False)
    expected = {"conv1.weight", *(f"bn1.{b}" for b in BN), "fc.weight", "fc.bias"}
    for stage in (1, 2, 3):
        for block in range(3):
            for conv in (1, 2):
                expected.add(f"layer{stage}.{block}.conv{conv}.weight")
                expected.update(f"layer{stage}.{block}.bn{conv}.{b}" for b in BN)
    assert set(router.state_dict()) == expected
    assert router.layer3[0].conv1.weight.shape == (64, 32, 3, 3) and router.fc.weight.shape == (3, 64)


def test_research_router_scores_and_gradients():
    router = ResearchRouter(num_experts=2, in_channels=1)
    x = torch.rand(4, 1, 16, 16, requires_grad=True)
    scores = router(x)
    assert scores.shape == (4, 2) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert x.grad.abs().sum() > 0 and router.conv1.weight.grad.abs().sum() > 0


def test_per_layer_router_is_pool_plus_linear():
    router = PerLayerRouter(5, 3, input_norm=False)
    x = torch.randn(2, 5, 4, 6)
    torch.testing.assert_close(router(x), router.fc(x.mean((2, 3))))
    normed = PerLayerRouter(5, 3).train()
    torch.testing.assert_close(normed(x), normed.fc(normed.input_norm(x.mean((2, 3)))))
    with pytest.raises(ValueError, match="num_experts"):
        PerLayerRouter(5, 0)


@pytest.mark.parametrize("score", ["logits", "softmax"])
def test_top_k_gate_is_one_forward_and_straight_through_backward(score):
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]], requires_grad=True)
    routing = top_k_routing(logits, 2, score=score)
    assert routing.expert_idx.tolist() == [[1, 0], [0, 2]]
    torch.testing.assert_close(routing.gate, torch.ones(2, 2))
    (routing.gate * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    if score == "logits":
        torch.testing.assert_close(logits.grad, torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.0, 4.0]]))
    else:
        assert logits.grad.abs().sum() > 0


def test_top_1_is_argmax_with_lowest_index_on_ties():
    logits = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    assert top_k_routing(logits, 1).expert_idx.tolist() == [[0], [1]]


@pytest.mark.parametrize(
    "logits, k, score, match",
    [
        (torch.randn(3), 1, "logits", "logits"),
        (torch.randn(2, 3), 4, "logits", "k must"),
        (torch.randn(2, 3), 1, "probs", "score"),
        (torch.randint(0, 3, (2, 3)), 1, "logits", "logits"),
    ],
)
def test_top_k_errors(logits, k, score, match):
    with pytest.raises(ValueError, match=match):
        top_k_routing(logits, k, score=score)


def test_load_balance_loss_values_and_gradient():
    balanced = torch.zeros(4, 2, requires_grad=True)
    loss = load_balance_loss(balanced, torch.tensor([[0], [1], [0], [1]]))
    torch.testing.assert_close(loss, torch.tensor(1.0))
    collapsed = torch.tensor([[20.0, 0.0]] * 4, requires_grad=True)
    loss = load_balance_loss(collapsed, torch.zeros(4, 1, dtype=torch.int64))
    assert loss.item() == pytest.approx(2.0, abs=1e-3)
    uneven = torch.randn(6, 3, requires_grad=True)
    load_balance_loss(uneven, top_k_routing(uneven, 1).expert_idx).backward()
    assert uneven.grad.abs().sum() > 0
    assert load_balance_loss(torch.zeros(0, 3), torch.zeros(0, 1, dtype=torch.int64)).item() == 0.0
    with pytest.raises(ValueError, match="same B"):
        load_balance_loss(torch.zeros(3, 2), torch.zeros(2, 1, dtype=torch.int64))
