"""The research recipe, exactly: each loss pinned against a hand computation on a tiny model, the step order,
the discarded router gradient of the expert step, the attack, the router learning rate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.train_utils import tiny_config

from advmoe.attacks.research import research_attack
from advmoe.nn import router_parameters
from advmoe.train import ExperimentConfig, Strategy, build_model, load_experiment_config, optimizer_groups
from advmoe.train.forward import TrainForward, model_mode
from advmoe.train.schedule import build_optimizer

REPO = Path(__file__).resolve().parents[2]


def _research(**kw):
    cfg = ExperimentConfig.from_dict(
        tiny_config("advmoe", router_loss="research", loss="trades", balance_weight=0.0, **kw)
    )
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    groups = optimizer_groups(cfg.train, model)
    conf = {"expert": cfg.train.optimizer, "router": cfg.train.router_optimizer}
    opts = {k: build_optimizer(v, conf[k]) for k, v in groups.items()}
    return Strategy(cfg.train, model, TrainForward(model), opts), model


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 16, 16, generator=g)
    x_adv = (x + 0.03 * torch.randn(6, 3, 16, 16, generator=g)).clamp(0, 1)
    return x, x_adv, torch.tensor([0, 1, 2, 3, 4, 5])


def _kl(p_logits, q_logits):
    """Batch mean of sum_c p log(p / q) with p = softmax(p_logits), written out."""
    p = torch.exp(p_logits) / torch.exp(p_logits).sum(1, keepdim=True)
    q = torch.exp(q_logits) / torch.exp(q_logits).sum(1, keepdim=True)
    return (p * (torch.log(p) - torch.log(q))).sum(1).mean()


def _ce(logits, y):
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    return -torch.log(p[torch.arange(len(y)), y]).mean()


def _router(model, x):
    return model.router(model.normalize(x)).double()


def test_router_step_loss_is_6_ce_plus_6_kl(data):
    strategy, model = _research()
    x, x_adv, y = data
    with model_mode(model, True):
        loss, _ = strategy.research_router_loss(x, x_adv, y)
        s_nat, s_adv = _router(model, x), _router(model, x_adv)
    expected = 6 * _ce(s_nat, y % 2) + 6 * _kl(s_nat, s_adv)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_expert_step_loss_is_trades_beta_6(data):
    strategy, model = _research()
    x, x_adv, y = data
    with model_mode(model, True):
        loss, _ = strategy.task_loss(x, x_adv, y, "trades")
        f_nat, f_adv = model(x).double(), model(x_adv).double()
    expected = _ce(f_nat, y) + 6 * _kl(f_nat, f_adv)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_attack_maximises_output_kl_plus_router_kl(data):
    """One step of the research attack, recomputed by hand: x0 = x + 0.001 N(0,1) (not clipped), one signed step."""
    _, model = _research()
    x, _, _ = data
    model.eval()
    with torch.no_grad():
        targets = {"router": _router(model, x).float() + 0.3}  # any target (the recipe's: train-mode scores)
        f_nat = model(x)
    torch.manual_seed(11)
    got = research_attack(model, x, eps=8 / 255, alpha=2 / 255, steps=1, router_targets=targets)
    torch.manual_seed(11)
    x0 = (x + 0.001 * torch.randn_like(x)).requires_grad_(True)
    objective = _kl(f_nat.double(), model(x0).double()) + _kl(targets["router"].double(), _router(model, x0))
    (grad,) = torch.autograd.grad(objective, [x0])
    expected = torch.min(torch.max(x0.detach() + 2 / 255 * grad.sign(), x - 8 / 255), x + 8 / 255).clamp(0, 1)
    torch.testing.assert_close(got, expected)


def test_expert_step_first_then_router_step_without_the_expert_steps_router_gradient(data, monkeypatch):
    strategy, model = _research()
    x, _, y = data
    order, checked = [], []
    routers = router_parameters(model)
    original_loss = strategy.research_router_loss

    def router_loss(*args):
        loss, logits = original_loss(*args)
        strategy._expected = torch.autograd.grad(loss, routers, retain_graph=True)
        return loss, logits

    def recording(group, opt):
        step = opt.step

        def wrapped(*a, **k):
            order.append(group)
            if group == "router":  # the router step uses exactly its own loss's gradient
                for p, g in zip(routers, strategy._expected, strict=True):
                    torch.testing.assert_close(p.grad, g)
                checked.append(True)
            return step(*a, **k)

        return wrapped

    monkeypatch.setattr(strategy, "research_router_loss", router_loss)
    for group, opt in strategy.optimizers.items():
        monkeypatch.setattr(opt, "step", recording(group, opt))
    strategy.step(x, y)
    assert order == ["expert", "router"] and checked == [True]


def test_research_config_is_the_research_recipe():
    cfg = load_experiment_config(REPO / "configs" / "cifar10_resnet18_advmoe_research.yaml")
    t = cfg.train
    assert (t.strategy, t.loss, t.router_loss, cfg.model.router) == ("advmoe", "trades", "research", "research")
    assert (t.beta, t.router_alpha, t.balance_weight, t.decay_unused_experts) == (6.0, 6.0, 0.0, True)
    # research train_moe.py lines 196-197: the router optimizer is built from --lr/--momentum/--wd, like the model's
    assert t.router_optimizer == t.optimizer
    assert (t.optimizer.lr, t.optimizer.momentum, t.optimizer.weight_decay) == (0.1, 0.9, 5e-4)
