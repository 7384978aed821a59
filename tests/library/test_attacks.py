"""PGD, TRADES-PGD, the router attack, attack losses and the honest-evaluation checks."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers.attack_models import accuracy, digits_8x8, small_cnn, trained_mlp
from torch import nn

from advmoe.attacks import (
    EvaluationWarning,
    apgd,
    autoattack,
    check_black_box,
    check_evaluation_setup,
    cw_margin_loss,
    dlr_loss,
    dlr_targeted_loss,
    kl_loss,
    pgd,
    square_attack,
    trades_pgd,
)

TOL = 1e-6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_in_ball(x_adv, x, eps, norm):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps * (1 + 1e-5) + TOL, f"max {norm} distance {size.max().item()} > eps {eps}"


ATTACKS = {
    "pgd_ce": lambda m, x, y, eps, norm: pgd(m, x, y, eps, eps / 4, 5, norm=norm, generator=_gen()),
    "pgd_cw_restarts": lambda m, x, y, eps, norm: pgd(
        m, x, y, eps, eps / 4, 3, norm=norm, loss="cw", restarts=2, generator=_gen(), track_success=True
    ),
    "trades": lambda m, x, y, eps, norm: trades_pgd(m, x, eps, eps / 4, 5, norm=norm, generator=_gen()),
    "apgd_dlr": lambda m, x, y, eps, norm: apgd(m, x, y, eps, norm, n_iter=6, loss="dlr", generator=_gen()),
    "autoattack": lambda m, x, y, eps, norm: autoattack(m, x, y, eps, norm, "fast", n_iter=4, n_targets=2),
    "square": lambda m, x, y, eps, norm: square_attack(m, x, y, eps, n_queries=20, norm=norm, generator=_gen()),
}


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_result_in_eps_ball_and_unit_box(name, norm, eps):
    if name == "square" and norm == "l2":
        pytest.skip("the Square Attack is L-inf only")
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    x, y = x[:40], y[:40]
    x_adv = ATTACKS[name](model, x, y, eps, norm)
    _assert_in_ball(x_adv, x, eps, norm)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_restores_mode_requires_grad_and_leaves_no_grad(name):
    model = small_cnn()
    model.train()
    model[3].eval()  # a mixed-mode model: every module's own flag must survive
    model[0].bias.requires_grad_(False)
    before_modes = [m.training for m in model.modules()]
    before_req = [p.requires_grad for p in model.parameters()]
    x = torch.rand(6, 1, 8, 8, generator=_gen(1))
    y = torch.arange(6) % 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ATTACKS[name](model, x, y, 0.1, "linf")
    assert [m.training for m in model.modules()] == before_modes
    assert [p.requires_grad for p in model.parameters()] == before_req
    assert all(p.grad is None for p in model.parameters())


def test_pgd_drives_accuracy_far_below_clean():
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    clean = accuracy(model, x, y)
    assert clean > 0.9
    robust = accuracy(model, pgd(model, x, y, eps=0.15, alpha=0.04, steps=10, generator=_gen()), y)
    assert robust < 0.25 * clean, f"PGD left {robust:.3f} of {clean:.3f} clean accuracy"
    weak = accuracy(model, pgd(model, x, y, eps=0.02, alpha=0.01, steps=10, generator=_gen()), y)
    assert robust < weak <= clean  # a larger budget is stronger


def test_l2_pgd_lowers_accuracy():
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    robust = accuracy(model, pgd(model, x, y, eps=1.5, alpha=0.4, steps=10, norm="l2", generator=_gen()), y)
    assert robust < 0.5 * accuracy(model, x, y)


def test_restarts_and_tracking_keep_every_success():
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    x, y = x[:120], y[:120]
    kw = dict(eps=0.06, alpha=0.02, steps=5)
    with torch.no_grad():
        fooled_one = model(pgd(model, x, y, generator=_gen(3), **kw)).argmax(1) != y
        fooled_many = model(pgd(model, x, y, restarts=3, generator=_gen(3), **kw)).argmax(1) != y
        fooled_track = model(pgd(model, x, y, track_success=True, generator=_gen(3), **kw)).argmax(1) != y
    # the first restart replays the single run (same generator): its successes are kept per sample
    assert bool((fooled_many | ~fooled_one).all()) and bool((fooled_track | ~fooled_one).all())
    assert fooled_many.sum() >= fooled_one.sum() and 0 < fooled_one.sum() < len(y)


def test_pgd_without_random_start_is_deterministic_and_steps0_is_identity():
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    a = pgd(model, x[:8], y[:8], 0.1, 0.02, 3, random_start=False)
    b = pgd(model, x[:8], y[:8], 0.1, 0.02, 3, random_start=False)
    assert torch.equal(a, b)
    assert torch.equal(pgd(model, x[:8], y[:8], 0.1, 0.02, 0, random_start=False), x[:8])
    assert torch.equal(pgd(model, x[:8], y[:8], 0.0, 0.02, 3), x[:8])
    empty = pgd(model, x[:0], y[:0], 0.1, 0.02, 3)
    assert empty.shape == (0, 1, 8, 8)


def test_pgd_callable_loss_scalar_and_per_sample():
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    x, y = x[:50], y[:50]
    per_sample = pgd(model, x, y, 0.15, 0.04, 5, loss=lambda z, t: F.cross_entropy(z, t, reduction="none"))
    scalar = pgd(model, x, y, 0.15, 0.04, 5, loss=lambda z, t: F.cross_entropy(z, t), restarts=2)
    assert accuracy(model, per_sample, y) < 0.5 and accuracy(model, scalar, y) < 0.5
    with pytest.raises(ValueError, match="loss must return"):
        pgd(model, x, y, 0.1, 0.02, 1, loss=lambda z, t: z)


def test_trades_pgd_increases_kl():
    model = trained_mlp()
    _, _, x, _ = digits_8x8()
    with torch.no_grad():
        ref = model(x)
        x_adv = trades_pgd(model, x, 0.1, 0.02, 10, generator=_gen())
        kl_adv = kl_loss(model(x_adv), ref).mean()
        kl_noise = kl_loss(model((x + 0.1 * (2 * torch.rand(x.shape, generator=_gen()) - 1)).clamp(0, 1)), ref).mean()
    assert kl_adv > 5 * kl_noise and kl_adv > 0.5


def test_cw_margin_on_hand_made_logits():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 1, 2])
    assert torch.allclose(cw_margin_loss(logits, y), torch.tensor([-2.0, 3.0, 0.0]))


def test_dlr_on_hand_made_logits():
    logits = torch.tensor([[4.0, 2.0, 1.0, 0.0], [1.0, 5.0, 3.0, 2.0]])
    y = torch.tensor([0, 0])
    # sample 0: -(4 - 2) / (4 - 1) ; sample 1: -(1 - 5) / (5 - 2)
    assert torch.allclose(dlr_loss(logits, y), torch.tensor([-2 / 3, 4 / 3]))
    # invariant to shift and positive scale
    assert torch.allclose(dlr_loss(7 * logits + 3, y), dlr_loss(logits, y), atol=1e-6)
    target = torch.tensor([3, 2])
    # sample 0: -(4 - 0) / (4 - (1 + 0) / 2) ; sample 1: -(1 - 3) / (5 - (2 + 1) / 2)
    assert torch.allclose(dlr_targeted_loss(logits, y, target), torch.tensor([-4 / 3.5, 2 / 3.5]))
    with pytest.raises(ValueError, match="3 classes"):
        dlr_loss(logits[:, :2], y)


def test_kl_is_zero_on_equal_logits_and_finite_when_probabilities_underflow():
    logits = torch.tensor([[0.0, 200.0, -200.0]])
    assert kl_loss(logits, logits).abs().max() < 1e-6
    value = kl_loss(torch.tensor([[200.0, 0.0, -200.0]]), logits)
    assert torch.isfinite(value).all() and value.item() > 100


BAD_ARGS = [
    (dict(eps=-0.1), "eps"),
    (dict(eps=math.nan), "eps"),
    (dict(alpha=-1.0), "alpha"),
    (dict(steps=-1), "steps"),
    (dict(steps=1.5), "steps"),
    (dict(norm="l1"), "norm"),
    (dict(loss="hinge"), "loss"),
    (dict(restarts=0), "restarts"),
]


@pytest.mark.parametrize("kwargs,word", BAD_ARGS, ids=[w + str(i) for i, (_, w) in enumerate(BAD_ARGS)])
def test_pgd_bad_arguments(kwargs, word):
    model = trained_mlp()
    args = dict(eps=0.1, alpha=0.01, steps=2) | kwargs
    with pytest.raises(ValueError, match=word):
        pgd(model, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), **args)


def test_bad_inputs_raise_clear_errors():
    model = trained_mlp()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="y must have shape"):
        pgd(model, x, y[:1], 0.1, 0.01, 1)
    with pytest.raises(TypeError, match="y must be an int64"):
        pgd(model, x, y.float(), 0.1, 0.01, 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(model, x * 255, y, 0.1, 0.01, 1)
    with pytest.raises(TypeError, match="floating point"):
        pgd(model, (x * 255).to(torch.uint8), y, 0.1, 0.01, 1)
    with pytest.raises(ValueError, match="batched"):
        pgd(model, x[0, 0, 0], y, 0.1, 0.01, 1)
    with pytest.raises(TypeError, match="nn.Module"):
        pgd(lambda t: t, x, y, 0.1, 0.01, 1)
    with pytest.raises(ValueError, match="eps"):
        trades_pgd(model, x, -1.0, 0.01, 1)


# --- honest-evaluation checks -------------------------------------------------------------------------


def _messages(model, x, y=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages = check_evaluation_setup(model, x, y)
    assert [str(w.message) for w in caught if issubclass(w.category, EvaluationWarning)] == messages
    return messages


def test_clean_setup_gives_no_warning():
    _, _, x, y = digits_8x8()
    assert _messages(trained_mlp(), x[:16], y[:16]) == []


def test_train_mode_and_randomness_warn_without_changing_the_model():
    model = small_cnn().train()
    bn = model[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    messages = _messages(model, torch.rand(8, 1, 8, 8, generator=_gen()))
    assert any("train mode" in m for m in messages)
    assert any("randomised" in m for m in messages)  # dropout in train mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched
    assert bn.training and all(p.grad is None for p in model.parameters())


def test_probability_outputs_warn():
    model = nn.Sequential(trained_mlp(), nn.Softmax(dim=1))
    _, _, x, y = digits_8x8()
    assert any("probabilities" in m for m in _messages(model, x[:16], y[:16]))


class _HardGate(nn.Module):
    """Rounds its input: the gradient through it is exactly zero (like a hard mask)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x))


def test_zero_gradients_warn():
    _, _, x, y = digits_8x8()
    messages = _messages(_HardGate(trained_mlp()), x[:16], y[:16])
    assert any("100% of the samples have an exactly zero input gradient" in m for m in messages)


def test_black_box_stronger_warns():
    robust_grad = torch.tensor([True, True, False, True])
    with pytest.warns(EvaluationWarning, match="fooled 1 sample"):
        check_black_box(robust_grad, torch.tensor([True, False, False, True]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_black_box(robust_grad, robust_grad) == []
    with pytest.raises(ValueError, match="same shape"):
        check_black_box(robust_grad, robust_grad[:2])


# --- router attack ------------------------------------------------------------------------------------


def _moe_model() -> nn.Module:
    from advmoe.nn import SparseMoEConv2d

    torch.manual_seed(0)
    kw = dict(padding=1, router="per_layer", backend="reference")
    return nn.Sequential(
        SparseMoEConv2d(1, 8, 3, num_experts=4, top_k=1, **kw),
        nn.ReLU(),
        SparseMoEConv2d(8, 8, 3, num_experts=4, top_k=2, **kw),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


def test_router_attack_changes_routing_more_than_noise():
    from advmoe.attacks import router_attack, routing_changes
    from advmoe.nn import forward_with_aux

    model = _moe_model()
    x = torch.rand(16, 1, 8, 8, generator=_gen(2))
    with torch.no_grad():
        _, clean = forward_with_aux(model, x)
        noise = (x + 0.1 * (2 * torch.rand(x.shape, generator=_gen(3)) - 1)).clamp(0, 1)
        noisy = routing_changes(clean.routing, forward_with_aux(model, noise)[1].routing).float().mean()
    x_adv = router_attack(model, x, 0.1, 0.025, 10, generator=_gen())
    _assert_in_ball(x_adv, x, 0.1, "linf")
    with torch.no_grad():
        attacked = routing_changes(clean.routing, forward_with_aux(model, x_adv)[1].routing)
    assert attacked.float().mean() > max(0.5, 2 * noisy.item()), (attacked, noisy)
    assert attacked.max() <= 2 and all(p.grad is None for p in model.parameters())
    x_l2 = router_attack(model, x, 1.0, 0.25, 3, norm="l2", generator=_gen())
    _assert_in_ball(x_l2, x, 1.0, "l2")


def test_router_attack_needs_routers_and_routing_changes_counts_sets():
    from advmoe.attacks import router_attack, routing_changes

    with pytest.raises(ValueError, match="routers"):
        router_attack(trained_mlp(), torch.rand(2, 1, 8, 8), 0.1, 0.01, 2)
    clean = {"a": torch.tensor([[0, 1], [2, 3]]), "b": torch.tensor([[1], [0]])}
    adv = {"a": torch.tensor([[1, 0], [2, 1]]), "b": torch.tensor([[0], [0]])}  # order within a set ignored
    assert routing_changes(clean, adv).tolist() == [1, 1]


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_nan_input_propagates_to_its_own_sample_only(name):
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    x, y = x[:6].clone(), y[:6]
    x[2, 0, 3, 3] = float("nan")
    out = ATTACKS[name](model, x, y, 0.1, "linf")
    assert out.flatten(1).isnan().any(1).tolist() == [False, False, True, False, False, False]


# --- on a GPU (skipped without one; run with `pytest -m cuda tests/library/test_attacks.py`) ------------------


@pytest.mark.cuda
def test_attacks_on_cuda_with_a_cuda_generator():
    model = trained_mlp()
    gpu = copy.deepcopy(model).cuda().eval()
    _, _, x, y = digits_8x8()
    x, y = x[:64].cuda(), y[:64].cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    outs = {
        "pgd": pgd(gpu, x, y, 0.1, 0.025, 5, restarts=2, generator=gen),
        "trades": trades_pgd(gpu, x, 0.1, 0.025, 5, generator=gen),
        "autoattack": autoattack(gpu, x, y, 0.1, version="fast", n_iter=5, square_queries=20, generator=gen),
        "square": square_attack(gpu, x, y, 0.1, n_queries=20, generator=gen),
    }
    for name, out in outs.items():
        assert out.device == x.device, name
        _assert_in_ball(out, x, 0.1, "linf")
    assert accuracy(gpu, outs["autoattack"], y) < accuracy(gpu, x, y)


@pytest.mark.cuda
def test_router_attack_on_cuda_with_the_fast_backend():
    from advmoe.attacks import router_attack
    from advmoe.nn import SparseMoEConv2d

    torch.manual_seed(0)
    kw = dict(padding=1, router="per_layer", backend="auto")
    model = (
        nn.Sequential(
            SparseMoEConv2d(3, 16, 3, num_experts=4, top_k=1, **kw),
            nn.ReLU(),
            SparseMoEConv2d(16, 16, 3, num_experts=2, top_k=1, **kw),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )
        .cuda()
        .eval()
    )
    x = torch.rand(32, 3, 16, 16, device="cuda")
    x_adv = router_attack(model, x, 0.1, 0.025, 5, generator=torch.Generator(device="cuda").manual_seed(0))
    _assert_in_ball(x_adv, x, 0.1, "linf")
