"""advmoe.eval on hand-made cases whose answers are known exactly.

The toy models only look at the mean brightness m of a constant grey image, so an L-inf attack of budget
eps can move m anywhere in [c - eps, c + eps] and the robust answer of each sample follows by hand.
"""

import json
import math
import warnings

import pytest
import torch
from torch import nn

from advmoe.eval import (
    EvalConfig,
    Tally,
    UsageCounter,
    evaluate,
    format_result,
    iter_batches,
    markdown_table,
    mean_std,
    routing_unchanged,
    summarize,
)
from advmoe.nn import RoutedModel, Router, SparseMoEConv2d

EPS = 8 / 255  # 0.0314
SCALE = 20.0


def grey(values, size=4):
    """(N, 1, size, size) constant images of the given brightness values."""
    v = torch.tensor(values, dtype=torch.float32)
    return v[:, None, None, None].expand(-1, 1, size, size).contiguous()


def cfg(**kw):
    base = dict(
        eps=EPS,
        attacks=["pgd_ce", "pgd_cw"],
        pgd_steps=6,
        pgd_alpha=EPS / 4,
        pgd_restarts=1,
        router_attack_steps=6,
        progress=False,
    )
    return EvalConfig(**{**base, **kw})


class BrightnessRouter(Router):
    """Scores [r - m, m - r]: expert 0 below brightness r, expert 1 above.

    The scale is small on purpose: the straight-through gate passes the router score's gradient into the
    loss, and with a large scale it would dominate the experts' gradient and no masking would show.
    """

    def __init__(self, threshold=0.5, constant=False):
        super().__init__()
        self.num_experts = 2
        self.threshold = threshold
        self.constant = constant
        self.dummy = nn.Parameter(torch.zeros(()))  # a router parameter, so router_parameters() is not empty

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3)) + self.dummy
        if self.constant:
            m = m.detach() * 0 + 1.0 + self.dummy  # always expert 1, whatever the input
        return torch.stack([self.threshold - m, m - self.threshold], dim=1)  # scale 1: weak gate gradient


class ToyMoE(RoutedModel):
    """One 1x1 SparseMoEConv2d with two 2-channel experts; logits = spatial mean of the expert's output.

    Expert 0: logits SCALE * [m - 0.1, 0.1 - m] (class 0 iff m > 0.1).
    Expert 1: logits SCALE * [0.1 - m, m - 0.1] (class 1 iff m > 0.1).
    """

    def __init__(self, constant_router=False):
        super().__init__(router=BrightnessRouter(constant=constant_router), top_k=1)
        self.moe = SparseMoEConv2d(1, 2, 1, num_experts=2, top_k=1, router=None, backend="reference")
        with torch.no_grad():
            self.moe.weight.copy_(SCALE * torch.tensor([1.0, -1.0, -1.0, 1.0]).view(4, 1, 1, 1))
            self.moe.bias.copy_(SCALE * torch.tensor([-0.1, 0.1, 0.1, -0.1]))

    def forward(self, x):
        x, routing = self.prepare(x)
        return self.moe(x, routing).mean(dim=(2, 3))


class Threshold(nn.Module):
    """Dense: class 1 iff brightness > 0.5."""

    def __init__(self, constant=False):
        super().__init__()
        self.fc = nn.Linear(1, 2)
        self.constant = constant
        with torch.no_grad():
            self.fc.weight.copy_(SCALE * torch.tensor([[-1.0], [1.0]]))
            self.fc.bias.copy_(SCALE * torch.tensor([0.5, -0.5]))

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))[:, None]
        return self.fc(m * 0 + 0.9) if self.constant else self.fc(m)


# Brightness, label, and by hand (see ToyMoE): routed expert, clean, plain-attack, fixed-pathway outcome.
#   A 0.49 y0: expert 0 correct; CE/CW push m down (robust); pathway 1 pushes m up across 0.5 -> expert 1 -> 1
#   B 0.30 y0: expert 0, robust everywhere
#   C 0.80 y1: expert 1, robust everywhere
#   D 0.08 y1: expert 0 correct clean, attack pushes m over 0.1 -> wrong
#   E 0.30 y1: misclassified clean
TOY_X = grey([0.49, 0.30, 0.80, 0.08, 0.30])
TOY_Y = torch.tensor([0, 0, 1, 1, 1])


@pytest.fixture(scope="module")
def toy_result():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate(ToyMoE().eval(), (TOY_X, TOY_Y), cfg())


def test_toy_accuracies_match_hand_computation(toy_result):
    r = toy_result
    assert r["num_samples"] == 5
    assert r["sa"] == pytest.approx(4 / 5)
    assert r["ra"]["pgd_ce"] == pytest.approx(3 / 5)  # A survives: the gradient through expert 0 points away
    assert r["ra"]["pgd_cw"] == pytest.approx(3 / 5)
    assert r["ra_frozen_routing"] == pytest.approx(3 / 5)  # routing pinned: A, B, C robust
    # pathway 1's attack pushes A up across the router threshold (wrong on the real model) and D down
    # (still right on the real model, whose expert 0 handles it); pathway 0's attack is the plain one
    assert r["ra_pathway"] == {"0": pytest.approx(3 / 5), "1": pytest.approx(3 / 5)}
    assert r["ra_pathway_worst"] == pytest.approx(2 / 5)  # pathway 1's attack breaks A on the real model
    assert r["ra"]["router_attack"] == pytest.approx(2 / 5)  # moving A across the router threshold breaks it
    assert r["ra_worst"] == pytest.approx(2 / 5)
    assert r["model"] == {"moe": True, "num_pathways": 2, "num_experts": {"moe": 2}}


def test_toy_router_robustness_and_usage(toy_result):
    rob = toy_result["router_robustness"]
    assert rob["pgd_ce"]["all_layers"] == pytest.approx(1.0)  # no plain attack crosses the router threshold
    assert rob["pgd_ce"]["per_layer"] == {"moe": pytest.approx(1.0)}
    assert rob["router_attack"]["all_layers"] == pytest.approx(4 / 5)  # only A (0.01 from it) flips
    usage = toy_result["expert_usage"]
    assert usage["clean"] == {"moe": [4, 1]}
    assert usage["pgd_ce"] == {"moe": [4, 1]}
    assert usage["router_attack"] == {"moe": [3, 2]}


def test_masked_gradients_warn(toy_result):
    assert any("masks gradients" in w for w in toy_result["warnings"])


def test_result_is_json_and_formats(toy_result):
    text = json.dumps(toy_result)
    assert json.loads(text)["sa"] == pytest.approx(0.8)
    report = format_result(toy_result)
    assert "RA with routing frozen" in report and "80.0" in report and "| moe |" in report


def test_router_robustness_is_one_when_routing_cannot_change():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = evaluate(ToyMoE(constant_router=True).eval(), (TOY_X, TOY_Y), cfg(attacks=["pgd_ce"]))
    for attack in ("pgd_ce", "router_attack"):
        assert r["router_robustness"][attack]["all_layers"] == 1.0
    assert r["expert_usage"]["clean"] == {"moe": [0, 5]}


@pytest.mark.filterwarnings("ignore:autoattack. 2 classes")
def test_dense_model_known_values():
    x = grey([0.2, 0.49, 0.8, 0.52, 0.7])  # robust, near (fooled), robust, near (fooled), misclassified
    y = torch.tensor([0, 0, 1, 1, 0])
    r = evaluate(Threshold().eval(), (x, y), cfg(attacks=["pgd_ce", "pgd_cw", "autoattack"], autoattack_version="fast"))
    assert r["sa"] == pytest.approx(0.8)
    for attack in ("pgd_ce", "pgd_cw", "autoattack"):
        assert r["ra"][attack] == pytest.approx(0.4), attack
    assert r["ra_worst"] == pytest.approx(0.4)
    for key in ("ra_frozen_routing", "ra_pathway", "ra_pathway_worst", "router_robustness", "expert_usage"):
        assert r[key] is None
    assert r["model"]["num_pathways"] == 1


def test_eps_zero_gives_ra_equal_sa_and_batches_add_up():
    x = grey([0.1, 0.6, 0.45, 0.9, 0.2, 0.7, 0.55])
    y = torch.tensor([0, 1, 1, 1, 0, 0, 1])
    r = evaluate(Threshold().eval(), (x, y), cfg(eps=0.0, batch_size=3, attacks=["pgd_ce"]))
    assert r["sa"] == pytest.approx(5 / 7) and r["ra"]["pgd_ce"] == pytest.approx(5 / 7)
    r2 = evaluate(Threshold().eval(), list(zip(x.split(2), y.split(2), strict=True)), cfg(eps=0.0, max_samples=4))
    assert r2["num_samples"] == 4 and r2["sa"] == pytest.approx(3 / 4)


def test_warnings_for_dishonest_setups():
    x = grey([0.2, 0.6] * 12)
    y = torch.tensor([1, 1] * 12)
    with pytest.warns(UserWarning) as record:
        r = evaluate(Threshold(constant=True).train(), (x, y), cfg(attacks=["pgd_ce"]))
    text = " ".join(str(w.message) for w in record)
    assert "does not depend on the input" in text or "zero input gradient" in text
    assert "no attack changed a single prediction" in text
    assert any("train mode" in w for w in r["warnings"])


def test_model_mode_restored_and_eval_used():
    model = ToyMoE().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate(model, (TOY_X[:2], TOY_Y[:2]), cfg(attacks=[], check_model=False))
    assert all(m.training for m in model.modules())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="no samples"):
        evaluate(Threshold().eval(), (grey([]), torch.zeros(0, dtype=torch.long)), cfg())
    with pytest.raises(ValueError, match="x has 2 samples but y has 3"):
        evaluate(Threshold().eval(), (grey([0.1, 0.2]), torch.zeros(3, dtype=torch.long)), cfg())
    with pytest.raises(ValueError, match="unknown attack"):
        EvalConfig(attacks=["fgsm"])
    with pytest.raises(ValueError, match="unknown key"):
        evaluate(Threshold().eval(), (grey([0.1]), torch.zeros(1, dtype=torch.long)), {"epsilon": 0.1})
    with pytest.raises(TypeError, match="data must be"):
        evaluate(Threshold().eval(), 3, cfg())


def test_routing_unchanged_per_layer_and_overall():
    clean = {"a": torch.tensor([[0], [1], [1]]), "b": torch.tensor([[0, 1], [1, 0], [0, 1]])}
    adv = {"a": torch.tensor([[0], [0], [1]]), "b": torch.tensor([[0, 1], [1, 0], [1, 0]])}
    out = routing_unchanged(clean, adv)
    assert out["a"].tolist() == [True, False, True]
    assert out["b"].tolist() == [True, True, False]  # order of the k slots matters
    assert out["all_layers"].tolist() == [True, False, False]
    assert routing_unchanged({}, {}) == {}
    with pytest.raises(ValueError, match="different layers"):
        routing_unchanged(clean, {"a": clean["a"]})


def test_usage_counter_and_tally():
    usage = UsageCounter({"a": 3})
    usage.add({"a": torch.tensor([[0], [2], [2]])})
    usage.add({"a": torch.tensor([[2]])})
    assert usage.as_dict() == {"a": [1, 0, 3]}
    assert usage.fractions()["a"] == pytest.approx([0.25, 0.0, 0.75])
    with pytest.raises(ValueError, match="out of range"):
        usage.add({"a": torch.tensor([[3]])})
    t = Tally()
    t.add("x", torch.tensor([True, False, True]))
    assert t.mean("x") == pytest.approx(2 / 3) and t.count("x") == 3 and t.mean("y") is None
    with pytest.raises(ValueError, match="1-D bool"):
        t.add("x", torch.ones(2))


def test_report_helpers():
    mean, std, n = mean_std([0.5, None, 0.7])
    assert (mean, n) == (pytest.approx(0.6), 2) and std == pytest.approx(math.sqrt(0.02))
    assert mean_std([None]) == (None, None, 0)
    table = markdown_table([{"m": "a", "v": (0.5, 0.1, 3)}, {"m": "b", "v": None}], [("m", "M"), ("v", "V")], ["v"])
    assert table.splitlines()[2] == "| a | 50.0 ± 10.0 |" and table.splitlines()[3] == "| b | – |"


def test_summarize_flattens(toy_result):
    s = summarize(toy_result)
    assert s["sa"] == pytest.approx(0.8) and s["ra_pgd_ce"] == pytest.approx(0.6)
    assert s["router_unchanged_router_attack"] == pytest.approx(0.8)
    assert s["ra_pathway_worst"] == pytest.approx(0.4)


def test_iter_batches_dataset_in_order():
    ds = torch.utils.data.TensorDataset(grey([0.1, 0.2, 0.3, 0.4, 0.5]), torch.arange(5))
    batches, total = iter_batches(ds, 2, max_samples=3)
    ys = [y.tolist() for _, y in batches]
    assert total == 2 and ys == [[0, 1], [2]]
