"""Trainer strategies: each step changes exactly the parameter groups it should; losses are stable; NaN stops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.train_utils import tiny_config

from advmoe.attacks.losses import kl_loss
from advmoe.data import build_dataset
from advmoe.nn import expert_parameters, router_parameters
from advmoe.train import ExperimentConfig, NonFiniteLossError, Strategy, build_model, optimizer_groups, train
from advmoe.train.forward import TrainForward
from advmoe.train.losses import research_router_loss, trades_loss
from advmoe.train.schedule import build_optimizer, lr_at


@pytest.fixture(scope="module")
def batch():
    ds = build_dataset("digits", split="train", size=16, channels=3)
    xs, ys = zip(*(ds[i] for i in range(8)), strict=True)
    return torch.stack(xs), torch.stack(ys)


def make(strategy: str, **train_kw):
    cfg = ExperimentConfig.from_dict(tiny_config(strategy, **train_kw))
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    groups = optimizer_groups(cfg.train, model)
    opt_cfg = {"model": cfg.train.optimizer, "expert": cfg.train.optimizer, "router": cfg.train.router_optimizer}
    opts = {name: build_optimizer(params, opt_cfg[name]) for name, params in groups.items()}
    return Strategy(cfg.train, model, TrainForward(model), opts), model


def snapshot(params):
    return [p.detach().clone() for p in params]


def changed(before, params):
    return [not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True)]


@pytest.mark.parametrize(
    "kw, routers_change, experts_change",
    [
        ({"router_steps": 1, "expert_steps": 0}, True, False),
        ({"router_steps": 0, "expert_steps": 1}, False, True),
        ({"router_steps": 1, "expert_steps": 0, "router_loss": "research", "loss": "trades"}, True, False),
        ({"router_steps": 1, "expert_steps": 1, "loss": "trades"}, True, True),
    ],
    ids=["router_step", "expert_step", "research_router_step", "both_steps_trades"],
)
def test_advmoe_steps_touch_only_their_group(batch, kw, routers_change, experts_change):
    strategy, model = make("advmoe", **kw)
    routers, experts = router_parameters(model), expert_parameters(model)
    r0, e0 = snapshot(routers), snapshot(experts)
    out = strategy.step(*batch)
    assert math.isfinite(out["loss"])
    r_changed, e_changed = changed(r0, routers), changed(e0, experts)
    assert all(r_changed) if routers_change else not any(r_changed), r_changed
    if experts_change:  # every expert/backbone tensor moves (weight decay + gradients)
        assert sum(e_changed) == len(e_changed), f"{sum(e_changed)}/{len(e_changed)} expert tensors changed"
    else:
        assert not any(e_changed)
    assert all(p.requires_grad for p in model.parameters())  # only_trainable restored the flags


@pytest.mark.parametrize("strategy, moe", [("pgd_at", False), ("trades", False), ("moe_at", True)])
def test_joint_strategies_update_every_parameter(batch, strategy, moe):
    strat, model = make(strategy, moe=moe)
    params = list(model.parameters())
    before = snapshot(params)
    out = strat.step(*batch)
    assert math.isfinite(out["loss"]) and 0.0 <= out["adv_acc"] <= 1.0
    flags = changed(before, params)
    assert all(flags), f"{sum(flags)}/{len(flags)} tensors changed"
    if moe:
        assert router_parameters(model)  # the joint update really included routers


def test_advmoe_on_dense_model_is_refused():
    cfg = ExperimentConfig.from_dict(tiny_config("advmoe", moe=False))
    model, _ = build_model(cfg)
    with pytest.raises(ValueError, match="needs an MoE model"):
        optimizer_groups(cfg.train, model)


def test_nan_loss_stops_before_the_update(batch):
    strategy, model = make("pgd_at", attack={"steps": 0})
    with torch.no_grad():
        list(model.parameters())[-2].fill_(float("nan"))  # the classifier weight
    before = snapshot(model.parameters())
    with pytest.raises(NonFiniteLossError, match="not finite"):
        strategy.step(*batch)
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b.nan_to_num(7.0), p.detach().nan_to_num(7.0))


def test_nan_during_training_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config("pgd_at", max_steps=2, save_every_steps=1, attack={"steps": 0}, eval_attack={"steps": 0})
    train(ExperimentConfig.from_dict(cfg), tmp_path)
    good = (tmp_path / "last.pt").read_bytes()
    cfg["train"].update(max_steps=4, optimizer={"lr": float("inf")})
    with pytest.raises(NonFiniteLossError):
        train(ExperimentConfig.from_dict(cfg), tmp_path, resume=True)
    assert (tmp_path / "last.pt").read_bytes() == good
    assert '"event": "error"' in (tmp_path / "log.jsonl").read_text()


def test_kl_is_stable_where_the_research_formula_is_nan():
    def grads(kl_fn):
        nat = torch.tensor([[200.0, -200.0, 0.0]], requires_grad=True)
        adv = torch.tensor([[-200.0, 200.0, 0.0]], requires_grad=True)
        value = kl_fn(adv, nat)
        value.backward()
        return value, nat.grad

    research = lambda adv, nat: F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="sum")
    value, grad = grads(research)
    assert torch.isnan(grad).any()  # the underflowed target poisons the gradient (how the router goes NaN)
    value, grad = grads(lambda adv, nat: kl_loss(adv, nat).mean())
    assert value.item() == pytest.approx(400.0, rel=1e-4) and torch.isfinite(grad).all()


def test_trades_and_research_router_loss_match_hand_computation():
    torch.manual_seed(0)
    nat, adv, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.arange(5) % 4
    p, logq = nat.softmax(1), adv.log_softmax(1)
    kl = (p * (p.log() - logq)).sum(1).mean()
    expected = F.cross_entropy(nat, y) + 6.0 * kl
    assert trades_loss(nat, adv, y, 6.0).item() == pytest.approx(expected.item(), rel=1e-5)
    scores_nat, scores_adv = nat[:, :2], adv[:, :2]
    p2, logq2 = scores_nat.softmax(1), scores_adv.log_softmax(1)
    expected_r = 2.0 * F.cross_entropy(scores_nat, y % 2) + 3.0 * (p2 * (p2.log() - logq2)).sum(1).mean()
    got = research_router_loss({"router": scores_nat}, {"router": scores_adv}, y, ce_weight=2.0, kl_weight=3.0)
    assert got.item() == pytest.approx(expected_r.item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs a model with routers"):
        research_router_loss({}, {}, y, 1.0, 1.0)


def test_cosine_schedule_and_warmup():
    from advmoe.train.config import OptimizerConfig

    cfg = OptimizerConfig(lr=0.1, schedule="cosine", warmup_epochs=1)
    assert lr_at(cfg, 0, 100, 10) == pytest.approx(0.01)
    assert lr_at(cfg, 9, 100, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 55, 100, 10) == pytest.approx(0.05)
    assert lr_at(cfg, 100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    step = OptimizerConfig(lr=0.1, schedule="step")
    assert [lr_at(step, s, 100, 10) for s in (0, 75, 90)] == pytest.approx([0.1, 0.01, 0.001])
