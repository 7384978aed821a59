"""APGD and the AutoAttack-style ensemble: schedule, strength relative to PGD, targeting, arguments."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers.attack_models import accuracy, digits_8x8, trained_mlp
from torch import nn

from advmoe.attacks import (
    EvaluationWarning,
    apgd,
    apgd_targeted,
    autoattack,
    autoattack_variant,
    dlr_targeted_loss,
    pgd,
    square_attack,
)
from advmoe.attacks.apgd import step_schedule
from advmoe.attacks.autoattack import resolve_square_queries
from advmoe.attacks.square import square_fraction


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_step_schedule_follows_the_paper():
    assert step_schedule(100) == (22, 3, 6)  # first checkpoint at 22%, intervals shrink by 3% down to 6%
    assert step_schedule(10) == (2, 1, 1)
    assert step_schedule(1) == (1, 1, 1)


def test_autoattack_at_least_as_strong_as_pgd_ce():
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    eps = 0.06
    ra_pgd = accuracy(model, pgd(model, x, y, eps, eps / 4, 20, generator=_gen()), y)
    x_aa = autoattack(model, x, y, eps, version="fast", generator=_gen())
    ra_aa = accuracy(model, x_aa, y)
    assert ra_aa <= ra_pgd, f"AutoAttack RA {ra_aa:.3f} > PGD-CE RA {ra_pgd:.3f}"
    assert 0 < ra_aa < accuracy(model, x, y)  # the budget is meaningful: some but not all samples fall
    # clean inputs are returned for the samples that were not fooled
    with torch.no_grad():
        fooled = model(x_aa).argmax(1) != y
        clean_wrong = model(x).argmax(1) != y
    changed = (x_aa != x).flatten(1).any(1)
    assert bool((changed <= fooled).all()) and not bool((changed & clean_wrong).any())
    assert (x_aa - x).abs().max() <= eps + 1e-6 and x_aa.min() >= 0 and x_aa.max() <= 1


def test_apgd_ce_beats_fixed_step_pgd_of_same_cost():
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    eps = 0.05
    ra_pgd = accuracy(model, pgd(model, x, y, eps, eps / 10, 20, generator=_gen()), y)
    ra_apgd = accuracy(model, apgd(model, x, y, eps, n_iter=20, generator=_gen()), y)
    assert ra_apgd <= ra_pgd + 0.01, (ra_apgd, ra_pgd)


def test_apgd_targeted_raises_the_targeted_loss():
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    x, y = x[:60], y[:60]
    target = (y + 1) % 10
    x_adv = apgd_targeted(model, x, y, target, eps=0.3, n_iter=30, generator=_gen())
    with torch.no_grad():
        before, after = dlr_targeted_loss(model(x), y, target), dlr_targeted_loss(model(x_adv), y, target)
    assert (after > before).float().mean() > 0.9  # the target's logit gained on the label's
    assert accuracy(model, x_adv, y) < 0.1  # the first misclassified iterate is kept
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6


def test_apgd_restarts_only_help():
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    x, y = x[:100], y[:100]
    with torch.no_grad():
        one = model(apgd(model, x, y, 0.04, n_iter=10, generator=_gen(5))).argmax(1) != y
        three = model(apgd(model, x, y, 0.04, n_iter=10, restarts=3, generator=_gen(5))).argmax(1) != y
    assert bool((three | ~one).all())


def test_autoattack_l2_and_dlr_loss():
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    x, y = x[:80], y[:80]
    x_adv = autoattack(model, x, y, 1.0, norm="l2", version="fast", n_iter=10, n_targets=2, generator=_gen())
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)
    x_dlr = apgd(model, x, y, 0.1, n_iter=10, loss="dlr", generator=_gen())
    assert accuracy(model, x_dlr, y) < 0.5


def test_autoattack_warnings_and_few_classes():
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    model.train()
    try:
        with pytest.warns(UserWarning, match="train mode"):
            autoattack(model, x[:4], y[:4], 0.05, n_iter=2, n_targets=1, square_queries=0)
    finally:
        model.eval()
    three_class = nn.Sequential(model, nn.Linear(10, 3)).eval()
    mask = y < 3
    with pytest.warns(UserWarning, match="too few for targeted DLR"):
        out = autoattack(three_class, x[mask][:10], y[mask][:10], 0.05, n_iter=2, square_queries=10)
    assert out.shape == x[mask][:10].shape


@pytest.mark.parametrize(
    "kwargs,error,word",
    [
        (dict(version="plus"), ValueError, "version"),
        (dict(n_targets=0), ValueError, "n_targets"),
        (dict(n_iter=-1), ValueError, "steps"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(norm="l1"), ValueError, "norm"),
    ],
)
def test_autoattack_bad_arguments(kwargs, error, word):
    args = dict(eps=0.1) | kwargs
    with pytest.raises(error, match=word):
        autoattack(trained_mlp(), torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), **args)


def test_apgd_bad_arguments_and_empty_batch():
    model = trained_mlp()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="restarts"):
        apgd(model, x, y, 0.1, restarts=0)
    with pytest.raises(ValueError, match="target"):
        apgd_targeted(model, x, y, torch.tensor([1]), 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autoattack(model, x[:0], y[:0], 0.1).shape == (0, 1, 8, 8)
    assert torch.equal(apgd(model, x, y, 0.0), x)


# --- Square Attack (black-box) ------------------------------------------------------------------------


class _Rounding(nn.Module):
    """Quantises its input to 5 levels: the input gradient is exactly zero (masked), the model still works."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


def test_square_schedule():
    assert square_fraction(0.8, 0, 5000) == 0.8
    assert square_fraction(0.8, 5, 5000) == 0.8  # it = 10: not yet past the first threshold
    assert square_fraction(0.8, 6, 5000) == 0.4
    assert square_fraction(0.8, 4999, 5000) == pytest.approx(0.8 / 512)


def test_square_attack_without_gradients():
    model = _Rounding(trained_mlp()).eval()
    _, _, x, y = digits_8x8()
    x, y = x[:100], y[:100]
    eps = 0.15
    x_sq = square_attack(model, x, y, eps, n_queries=300, generator=_gen())
    assert (x_sq - x).abs().max() <= eps + 1e-6 and x_sq.min() >= 0 and x_sq.max() <= 1
    ra_pgd = accuracy(model, pgd(model, x, y, eps, eps / 4, 10, generator=_gen()), y)
    ra_square = accuracy(model, x_sq, y)
    assert ra_pgd > 0.8 and ra_square < 0.3, (ra_pgd, ra_square)  # PGD is blind here, Square is not


def test_autoattack_with_square_flags_gradient_masking():
    model = _Rounding(trained_mlp()).eval()
    _, _, x, y = digits_8x8()
    x, y = x[:60], y[:60]
    with pytest.warns(EvaluationWarning, match="Square Attack fooled"):
        x_adv = autoattack(model, x, y, 0.15, version="fast", n_iter=5, n_targets=1, square_queries=300)
    assert accuracy(model, x_adv, y) < 0.3
    with warnings.catch_warnings():  # on an honest model the gradient attacks already win: no warning
        warnings.simplefilter("error", EvaluationWarning)
        autoattack(trained_mlp(), x, y, 0.3, version="fast", n_iter=10, n_targets=1, square_queries=50)


def test_square_bad_arguments():
    model = trained_mlp()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="linf"):
        square_attack(model, x, y, 0.1, norm="l2")
    with pytest.raises(ValueError, match="p_init"):
        square_attack(model, x, y, 0.1, p_init=0.0)
    with pytest.raises(ValueError, match="square_queries"):
        autoattack(model, x, y, 0.1, square_queries=-5)
    with pytest.raises(ValueError, match="square_queries"):
        autoattack_variant("fast", square_queries=1.5)
    with pytest.raises(ValueError, match="linf"):
        autoattack(model, x, y, 0.1, norm="l2", square_queries=10)
    assert torch.equal(square_attack(model, x, y, 0.1, n_queries=0), x)


# --- the standard suite includes Square; every run has a variant name ---------------------------------


def test_standard_includes_square_by_default_and_variants_are_named():
    assert resolve_square_queries("standard") == 5000 and resolve_square_queries("fast") == 0
    assert resolve_square_queries("standard", "l2") == 0  # Square is L-inf only
    assert autoattack_variant() == "autoattack-standard"
    assert autoattack_variant("standard", n_iter=100, n_targets=9, square_queries=5000) == "autoattack-standard"
    assert autoattack_variant("fast") == "autoattack-fast"
    assert autoattack_variant("fast", n_iter=25) == "autoattack-fast-25it"
    assert autoattack_variant("fast", n_iter=2, n_targets=1) == "autoattack-fast-2it-1t"
    assert autoattack_variant("standard", square_queries=0) == "autoattack-standard-nosquare"
    assert autoattack_variant("standard", norm="l2") == "autoattack-standard-nosquare"
    assert autoattack_variant("fast", square_queries=1000) == "autoattack-fast-square1000"
    with pytest.raises(ValueError, match="version"):
        autoattack_variant("plus")


def test_default_standard_run_reaches_square_and_catches_masking():
    # the quantised MLP has zero input gradients: only the Square Attack, which now runs by default in the
    # standard version, can fool it (and it warns that the gradient attacks missed those samples)
    model = _Rounding(trained_mlp()).eval()
    _, _, x, y = digits_8x8()
    x, y = x[:30], y[:30]
    with pytest.warns(EvaluationWarning, match="Square Attack fooled"):
        x_adv = autoattack(model, x, y, 0.15, n_iter=2, n_targets=1, generator=_gen())
    assert accuracy(model, x_adv, y) < 0.3
    with warnings.catch_warnings():  # fast: no Square, so the masked model looks robust
        warnings.simplefilter("error", EvaluationWarning)
        x_fast = autoattack(model, x, y, 0.15, version="fast", n_iter=2, n_targets=1, generator=_gen())
    assert accuracy(model, x_fast, y) > 0.5


def test_default_square_is_skipped_with_a_warning_for_flat_inputs():
    model = trained_mlp()
    _, _, x, y = digits_8x8()
    flat = x[:6].flatten(1)  # (B, 64): the MLP accepts it, the Square Attack needs images
    with pytest.warns(UserWarning, match="autoattack-standard-2it-nosquare"):
        out = autoattack(model, flat, y[:6], 0.05, n_iter=2)
    assert out.shape == flat.shape
    with pytest.raises(ValueError, match="images"):
        autoattack(model, flat, y[:6], 0.05, n_iter=2, square_queries=10)
