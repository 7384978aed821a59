"""Balance that holds in training: balance losses, config switch and bad input, usage logging, masked decay."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from helpers.train_utils import tiny_config

from advmoe.nn import moe_layers
from advmoe.nn.routing import balance_loss, entropy_balance_loss, load_balance_loss
from advmoe.train import ExperimentConfig, Strategy, build_model, optimizer_groups, train
from advmoe.train.distributed import DistInfo
from advmoe.train.forward import TrainForward
from advmoe.train.monitor import RunLog
from advmoe.train.schedule import build_optimizer
from advmoe.train.strategies import expert_row_parameters
from advmoe.train.trainer import _Run


def test_entropy_balance_loss_hand_values():
    # two samples, E = 2: softmax rows (0.5, 0.5) and (e/(1+e), 1/(1+e)); P = their mean
    logits = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    p1 = math.e / (1 + math.e)
    mean = [(0.5 + p1) / 2, (0.5 + 1 - p1) / 2]
    expected = 1 - (-sum(m * math.log(m) for m in mean)) / math.log(2)
    loss = entropy_balance_loss(logits)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[1, 0] > 0 > logits.grad[1, 1]  # pushes the favoured expert's score down
    assert entropy_balance_loss(torch.zeros(5, 3)).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy_balance_loss(torch.tensor([[30.0, 0.0, 0.0]] * 4)).item() == pytest.approx(1.0, abs=1e-6)
    assert entropy_balance_loss(torch.zeros(0, 2)).item() == 0.0


def test_balance_loss_by_name_and_unknown_names():
    logits, idx = torch.randn(6, 2), torch.randint(0, 2, (6, 1))
    assert torch.equal(balance_loss("switch", logits, idx), load_balance_loss(logits, idx))
    assert torch.equal(balance_loss("entropy", logits, idx), entropy_balance_loss(logits))
    with pytest.raises(ValueError, match="known: entropy, switch"):
        balance_loss("gini", logits, idx)


@pytest.mark.parametrize(
    "section, override, message",
    [
        ("train", {"balance_loss": "gini"}, r"train.balance_loss must be one of \['entropy', 'switch'\]"),
        ("train", {"balance_weight": -0.1}, "balance_weight must be a number >= 0"),
        ("train", {"balance_weight": float("nan")}, "balance_weight must be a number >= 0"),
        ("train", {"balance_weight": float("inf")}, "balance_weight must be finite"),
        ("model", {"router": "global"}, r"model.router must be one of \['research', 'per_layer', 'image'\]"),
    ],
)
def test_bad_balance_and_router_settings(section, override, message):
    cfg = tiny_config("moe_at")
    cfg[section].update(override)
    with pytest.raises(ValueError, match=message):
        ExperimentConfig.from_dict(cfg)


def test_research_recipe_needs_a_model_level_router():
    cfg = tiny_config("advmoe", router_loss="research", loss="trades")
    cfg["model"]["router"] = "per_layer"
    with pytest.raises(ValueError, match="research recipe .* needs a model-level router"):
        ExperimentConfig.from_dict(cfg)
    cfg["model"]["router"] = "research"
    ExperimentConfig.from_dict(cfg)


def _strategy(decay_unused: bool, **train_kw):
    cfg = ExperimentConfig.from_dict(
        tiny_config("moe_at", decay_unused_experts=decay_unused, attack={"steps": 0}, **train_kw)
    )
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    with torch.no_grad():  # the model-level router sends every sample to expert 0
        model.router.fc.bias.copy_(torch.tensor([1e4, -1e4]))
    groups = optimizer_groups(cfg.train, model)
    rows = [p for p in model.parameters() if id(p) in expert_row_parameters(model)]
    masked = () if decay_unused else rows
    opts = {k: build_optimizer(v, cfg.train.optimizer, masked) for k, v in groups.items()}
    return Strategy(cfg.train, model, TrainForward(model, cfg.train.balance_loss), opts), model


@pytest.mark.parametrize("decay_unused", [False, True])
def test_no_weight_decay_on_an_expert_without_samples(decay_unused):
    strategy, model = _strategy(decay_unused, balance_weight=0.0)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    layers = moe_layers(model)
    before = {name: layer.weight.detach().clone() for name, layer in layers}
    strategy.step(x, y)
    lr, wd = strategy.optimizers["model"].param_groups[0]["lr"], 5e-4
    for name, layer in layers:
        w = layer.expert_width
        assert strategy.last_usage[name].tolist() == [8, 0]
        unused_before, unused_after = before[name][w:], layer.weight.detach()[w:]
        if decay_unused:  # plain weight decay: the unchosen expert shrinks by lr * wd (no gradient)
            torch.testing.assert_close(unused_after, unused_before * (1 - lr * wd))
        else:
            assert torch.equal(unused_after, unused_before)
        assert not torch.equal(layer.weight.detach()[:w], before[name][:w])


def test_masked_decay_equals_plain_decay_for_used_experts():
    """Rows of an expert with samples get exactly SGD's weight decay (same update as the plain optimizer)."""
    results = []
    for decay_unused in (False, True):
        strategy, model = _strategy(decay_unused, balance_weight=0.0)
        strategy.step(torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10)
        results.append({name: layer.weight.detach()[: layer.expert_width].clone() for name, layer in moe_layers(model)})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name])


def test_usage_logged_from_the_first_step_and_collapse_warned(tmp_path):
    cfg = tiny_config("advmoe", max_steps=3, log_every_steps=10, eval_attack={"steps": 0})
    train(ExperimentConfig.from_dict(cfg), tmp_path)
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    assert steps[0]["step"] == 1 and steps[0]["usage"]  # logged at the first step despite log_every_steps=10
    model, _ = build_model(ExperimentConfig.from_dict(cfg))
    assert set(steps[0]["usage"]) == {name for name, _ in moe_layers(model)}
    for shares in steps[0]["usage"].values():
        assert len(shares) == 2 and sum(shares) == pytest.approx(1.0, abs=1e-3)
    epoch = next(e for e in events if e["event"] == "epoch")
    assert 0.5 <= epoch["max_expert_share"] <= 1.0 and "usage" in epoch and "collapsed_layers" in epoch

    run = types.SimpleNamespace(log=RunLog(tmp_path), dist=DistInfo())
    with pytest.warns(RuntimeWarning, match=r"layer1.0.conv1 96%"):
        _Run._warn_collapse(run, {"layer1.0.conv1": [0.96, 0.04], "layer1.0.conv2": [0.5, 0.5]}, 7)
    _Run._warn_collapse(run, {"layer1.0.conv1": [0.99, 0.01]}, 8)  # once per layer: no second warning
    warned = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["layers"] for e in warned if e["event"] == "collapse_warning"] == [{"layer1.0.conv1": 0.96}]


def test_config_name_lists_match_the_implementations():
    from advmoe.models.common import ROUTERS
    from advmoe.nn.routing import BALANCE_LOSSES
    from advmoe.train import config

    assert config.ROUTERS == ROUTERS and config.BALANCE_LOSSES == BALANCE_LOSSES
