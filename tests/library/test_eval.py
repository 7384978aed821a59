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
    assert r["ra_frozen_routing_rescored"] == pytest.approx(3 / 5)  # A's frozen example keeps expert 0: robust
    # the soft surrogate mixes the opposite experts by p0 - p1, which changes sign at the router threshold:
    # its PGD pushes A across 0.5, where the real model routes to expert 1 and is wrong
    assert r["ra_soft_routing"] == pytest.approx(2 / 5) and r["sa_soft_routing"] == pytest.approx(4 / 5)
    assert r["pathways"] == {"kind": "all", "count": 2}
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
    # over the 4 attacked samples (E, misclassified clean, is not counted): only A (0.01 from it) flips
    assert rob["router_attack"]["all_layers"] == pytest.approx(3 / 4)
    assert rob["router_attack"]["num_attacked"] == 4 and rob["pgd_ce"]["num_attacked"] == 4
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
    assert "RA, routing frozen to the clean choice, scored on the frozen model" in report
    assert "routing-frozen examples re-scored on the real model" in report
    assert "80.0" in report and "| moe |" in report and "Where each robust accuracy comes from" in report


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
    assert s["router_unchanged_router_attack"] == pytest.approx(0.75)
    assert s["ra_pathway_worst"] == pytest.approx(0.4)


def test_iter_batches_dataset_in_order():
    ds = torch.utils.data.TensorDataset(grey([0.1, 0.2, 0.3, 0.4, 0.5]), torch.arange(5))
    batches, total = iter_batches(ds, 2, max_samples=3)
    ys = [y.tolist() for _, y in batches]
    assert total == 2 and ys == [[0, 1], [2]]


# --- every stand-in's examples are re-scored on the real model (per-layer routers too) --------------------


class SteepRouter(Router):
    """Per-layer router on the layer input: scores K * [r - m, m - r] (expert 0 below brightness r).

    With a steep K the straight-through gate's router term dominates the input gradient of the real model,
    and for a correctly classified sample it points towards the router threshold (making the gate's
    chosen score smaller lowers the confidence): plain PGD walks away from the expert's own boundary.
    """

    def __init__(self, threshold=0.5, steepness=1000.0):
        super().__init__()
        self.num_experts = 2
        self.threshold, self.steepness = threshold, steepness

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return self.steepness * torch.stack([self.threshold - m, m - self.threshold], dim=1)


def brightness_moe(expert_logits, router):
    """One 1x1 SparseMoEConv2d with its own router; expert e's logits are SCALE * (a_e * m + b_e) (2 classes).

    ``expert_logits``: [[a0 (2,), b0 (2,)], [a1, b1]] per expert. Logits = spatial mean of the layer output.
    """
    # the research code's raw-logit gate: its steep router term masked plain PGD through the gate's estimator
    moe = SparseMoEConv2d(1, 2, 1, num_experts=2, top_k=1, router=router, backend="reference", gate_score="logits")
    with torch.no_grad():
        moe.weight.copy_(SCALE * torch.tensor([a for a, _ in expert_logits]).view(4, 1, 1, 1))
        moe.bias.copy_(SCALE * torch.tensor([b for _, b in expert_logits]).view(4))

    class PerLayerToy(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = moe

        def forward(self, x):
            return self.moe(x).mean(dim=(2, 3))

    return PerLayerToy().eval()


# Expert 0 (used below 0.5): class 1 iff m > 0.3. Expert 1 (above 0.5): class 1 iff m > 0.495.
PER_LAYER_EXPERTS = [[[-1.0, 1.0], [0.3, -0.3]], [[-1.0, 1.0], [0.495, -0.495]]]
# S1 0.52 y1: expert 1. Frozen PGD (expert 1's gradient only) pushes m to ~0.489 < 0.495: the frozen model is
#    fooled, but the real model routes 0.489 to expert 0, which is right (0.489 > 0.3). Plain PGD: right.
# S2 0.32 y1: expert 0. Frozen PGD pushes m below 0.3: wrong on the frozen AND on the real model (still
#    expert 0). Plain PGD through the gate's estimator followed the steep router term up, towards 0.5, and was
#    never fooled (masked gradient); on the model's true gradient (what attacks use) it is fooled too.
# R 0.80 y1 and T 0.25 y0: robust everywhere. W 0.20 y1: wrong when clean.
PER_LAYER_X = grey([0.52, 0.32, 0.80, 0.25, 0.20])
PER_LAYER_Y = torch.tensor([1, 1, 1, 0, 1])


def _quiet_evaluate(model, data, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate(model, data, config)


def test_per_layer_frozen_routing_examples_are_rescored_on_the_real_model():
    model = brightness_moe(PER_LAYER_EXPERTS, SteepRouter())
    r = _quiet_evaluate(
        model,
        (PER_LAYER_X, PER_LAYER_Y),
        cfg(pgd_steps=10, router_robustness=False, pathway_worst_case=False, soft_routing=False),
    )
    assert r["model"]["num_pathways"] is None  # per-layer router
    assert r["sa"] == pytest.approx(4 / 5)
    # the attacks follow the model's true gradient (advmoe.nn.gate_gradient): the steep router term no longer
    # masks S2 from plain PGD (through the gate's estimator S2 survived, RA 4/5)
    assert r["ra"] == {"pgd_ce": pytest.approx(3 / 5), "pgd_cw": pytest.approx(3 / 5)}
    assert r["ra_frozen_routing"] == pytest.approx(2 / 5)  # S1 and S2 fool the frozen model
    assert r["ra_frozen_routing_rescored"] == pytest.approx(3 / 5)  # on the real model only S2 is fooled
    assert r["ra_worst"] == pytest.approx(3 / 5)  # counted (scoring them only on the frozen model gave 4/5)
    rows = {row["result"]: row for row in r["evaluation_plan"]}
    assert rows["ra_frozen_routing"]["in_ra_worst"] is False
    assert rows["ra_frozen_routing_rescored"]["in_ra_worst"] is True
    assert rows["ra_frozen_routing_rescored"]["scored_on"].startswith("real model")


def test_per_layer_uniform_pathways_and_soft_surrogate_count_in_the_worst_case():
    model = brightness_moe(PER_LAYER_EXPERTS, SteepRouter())
    r = _quiet_evaluate(model, (PER_LAYER_X, PER_LAYER_Y), cfg(pgd_steps=10, frozen_routing=False))
    assert r["pathways"] == {"kind": "uniform", "count": 2}
    # pathway 0 (every layer on expert 0) breaks S2 as the frozen attack does; pathway 1 pushes S2 further
    # down through expert 1, where the real model routes it to expert 0 and is wrong as well
    assert r["ra_pathway"]["0"] == pytest.approx(3 / 5)
    assert r["ra_pathway_worst"] == pytest.approx(3 / 5)
    # the steep softmax is nearly hard, but the surrogate has no straight-through router term: its PGD
    # follows expert 0 down and breaks S2 on the real model
    assert r["ra_soft_routing"] == pytest.approx(3 / 5) and r["sa_soft_routing"] == pytest.approx(4 / 5)
    assert r["ra_worst"] == pytest.approx(3 / 5)
    assert r["ra"]["pgd_ce"] == pytest.approx(3 / 5)  # the true-gradient plain attack finds S2 as well
    assert not any("soft-routing surrogate" in w for w in r["warnings"])


def test_stand_ins_below_the_plain_attacks_raise_the_masking_warning():
    from advmoe.eval.evaluate import _result_warnings

    result = {
        "ra": {"pgd_ce": 0.8, "pgd_cw": 0.8},
        "ra_pathway_worst": 0.8,
        "ra_frozen_routing_rescored": None,
        "ra_soft_routing": 0.6,
        "num_samples": 5,
        "config": {"eps": 0.1},
        "sa": 0.8,
    }
    messages = _result_warnings(result)
    assert len(messages) == 1 and "soft-routing surrogate" in messages[0] and "0.600" in messages[0]
    result["ra_soft_routing"] = 0.8
    assert _result_warnings(result) == []


def test_soft_surrogate_examples_are_scored_on_the_hard_model():
    # constant experts (no weights): expert 0 says class 0 with logit SCALE, expert 1 class 1 with 3 * SCALE.
    # The hard model is class 0 iff m < 0.5. The router's score gap is 2 |m - 0.5|, median 0.6 on this batch,
    # so relative temperature 10 gives T = 6: p0 = sigmoid(2 (0.5 - m) / 6) < 0.75 on [0, 1], and the soft
    # mixture p0 * [S, 0] + p1 * [0, 3S] says class 1 everywhere.
    model = brightness_moe([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]], SteepRouter(steepness=1.0))
    x, y = grey([0.2, 0.3, 0.8]), torch.tensor([0, 0, 1])
    config = cfg(frozen_routing=False, pathway_worst_case=False, router_robustness=False, soft_routing_temperature=10)
    r = _quiet_evaluate(model, (x, y), config)
    assert r["sa"] == pytest.approx(1.0)
    assert r["sa_soft_routing"] == pytest.approx(1 / 3)  # the surrogate misclassifies both class-0 samples
    # its examples stay within eps of 0.2, 0.3 and 0.8: the hard model classifies all of them correctly
    assert r["ra_soft_routing"] == pytest.approx(1.0)
    assert r["ra_worst"] == pytest.approx(1.0)


def test_routing_kept_counts_only_attacked_samples():
    # F 0.52 y1 routes to expert 1; an attack that moves it below 0.5 hands it to expert 0, which is wrong.
    # B 0.30 y0 and C 0.80 y1 survive; E 0.30 y1 is wrong when clean (never attacked).
    x, y = grey([0.52, 0.30, 0.80, 0.30]), torch.tensor([1, 0, 1, 1])
    config = cfg(
        attacks=["autoattack"],
        autoattack_version="fast",
        autoattack_iters=10,
        frozen_routing=False,
        pathway_worst_case=False,
        soft_routing=False,
    )
    r = _quiet_evaluate(ToyMoE().eval(), (x, y), config)
    assert r["sa"] == pytest.approx(3 / 4) and r["ra"]["autoattack"] == pytest.approx(2 / 4)
    rob = r["router_robustness"]
    # AutoAttack returns the clean input for B and C (not fooled): counting them (and E) gave 3/4 kept
    assert rob["autoattack"]["num_attacked"] == 1 and rob["autoattack"]["all_layers"] == pytest.approx(0.0)
    # the router attack perturbs every sample; over the correctly classified ones only F changes experts
    assert rob["router_attack"]["num_attacked"] == 3
    assert rob["router_attack"]["all_layers"] == pytest.approx(2 / 3)  # counting E too gave 3/4
    assert r["autoattack_variant"] == "autoattack-fast-10it"
    assert r["attack_labels"]["autoattack"].startswith("autoattack-fast-10it (APGD-CE 10 it.")
    assert "no Square" in r["attack_labels"]["autoattack"]


def test_autoattack_variant_named_in_result_and_report():
    base = dict(attacks=["autoattack"], autoattack_targets=1, frozen_routing=False, check_model=False)
    x, y = grey([0.2, 0.8]), torch.tensor([0, 1])
    r = _quiet_evaluate(Threshold().eval(), (x, y), cfg(**base, autoattack_iters=2, autoattack_square_queries=3))
    assert r["autoattack_variant"] == "autoattack-standard-2it-1t-square3"
    assert "Square 3 queries" in r["attack_labels"]["autoattack"]
    assert "autoattack-standard-2it-1t-square3" in format_result(r)
    assert EvalConfig().autoattack_square_queries is None  # standard: the version's 5000 Square queries
    with pytest.raises(ValueError, match="autoattack_square_queries"):
        EvalConfig(autoattack_square_queries=-1)
    with pytest.raises(ValueError, match="soft_routing_temperature"):
        EvalConfig(soft_routing_temperature=0.0)
