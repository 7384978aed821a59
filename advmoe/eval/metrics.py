"""Per-sample correctness under clean inputs and attacks, and the tallies that turn it into accuracies.

Every metric of :func:`advmoe.eval.evaluate` is built from boolean per-sample vectors ("still classified
correctly"), so worst cases over several attacks are exact per-sample ANDs, never a min of averages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from advmoe.eval.config import EvalConfig

__all__ = [
    "ATTACK_LABELS",
    "GRADIENT_ATTACKS",
    "Tally",
    "attack_label",
    "autoattack_variant_of",
    "correct",
    "make_attack",
    "perturbed",
    "predict",
    "run_attack",
]

# Attacks that follow the model's gradients (the pathway and frozen-routing attacks reuse these).
GRADIENT_ATTACKS = ("pgd_ce", "pgd_cw")

ATTACK_LABELS = {
    "pgd_ce": "PGD-{steps} CE",
    "pgd_cw": "PGD-{steps} CW",
    "autoattack": "{variant} ({detail})",
    "router_attack": "router attack ({steps} steps)",
}


def autoattack_variant_of(cfg: EvalConfig) -> str:
    """The AutoAttack variant ``cfg`` runs, e.g. ``"autoattack-standard"`` or ``"autoattack-fast-25it"``."""
    from advmoe.attacks.autoattack import autoattack_variant

    return autoattack_variant(
        cfg.autoattack_version, cfg.norm, cfg.autoattack_iters, cfg.autoattack_targets, cfg.autoattack_square_queries
    )


def attack_label(name: str, cfg: EvalConfig, num_classes: int | None = None) -> str:
    """A readable label of attack ``name`` with the budget of ``cfg`` (``"PGD-50 CE"``, the AutoAttack variant
    and its parts, ...). ``num_classes`` (if known) says whether AutoAttack's APGD-T ran (>= 4 classes) or
    was replaced by APGD on the CW margin."""
    if name != "autoattack":
        steps = cfg.router_attack_steps if name == "router_attack" else cfg.pgd_steps
        label = ATTACK_LABELS[name].format(steps=steps)
        return label + (f" x {cfg.pgd_restarts} restarts" if name in GRADIENT_ATTACKS and cfg.pgd_restarts > 1 else "")
    from advmoe.attacks.autoattack import VERSIONS, resolve_square_queries

    it_ce, it_t, targets = VERSIONS[cfg.autoattack_version]
    if cfg.autoattack_iters is not None:
        it_ce = it_t = cfg.autoattack_iters
    if cfg.autoattack_targets is not None:
        targets = cfg.autoattack_targets
    parts = [f"APGD-CE {it_ce} it."]
    if num_classes is not None and num_classes < 4:
        parts.append(f"APGD-CW {it_t} it. (too few classes for APGD-T)")
    else:
        if num_classes is not None:
            targets = min(targets, num_classes - 1)
        parts.append(f"APGD-T {targets} targets x {it_t} it.")
    queries = resolve_square_queries(cfg.autoattack_version, cfg.norm, cfg.autoattack_square_queries)
    parts.append(f"Square {queries} queries" if queries else "no Square")
    return ATTACK_LABELS[name].format(
        variant=autoattack_variant_of(cfg), detail=" + ".join(parts[:-1]) + ", " + parts[-1]
    )


def perturbed(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) bool: whether the attack changed sample b at all (``x_adv[b] != x[b]`` anywhere)."""
    return (x_adv != x).flatten(1).any(dim=1)


Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predicted classes.

    Args:
        model: a module returning logits (B, classes).
        x: (B, C, H, W) inputs.

    Returns:
        (B,) int64 argmax of the logits.
    """
    return model(x).argmax(dim=1)


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) bool: whether each sample of ``x`` (B, C, H, W) is classified as its label ``y`` (B,)."""
    return predict(model, x) == y


def make_attack(name: str, cfg: EvalConfig, generator: torch.Generator | None = None) -> Attack:
    """The attack ``name`` with the budget of ``cfg``, as a function ``(model, x, y) -> x_adv``.

    Args:
        name: ``pgd_ce`` (PGD on cross-entropy), ``pgd_cw`` (PGD on the CW margin) or ``autoattack``.
        cfg: evaluation settings (eps, norm, PGD steps/step size/restarts, AutoAttack version).
        generator: random generator of the attacks' random starts, on the inputs' device (reproducible runs).

    Returns:
        A function taking (model, x (B, C, H, W) in [0, 1], y (B,)) and returning x_adv (B, C, H, W).

    Raises:
        ValueError: unknown attack name.
    """
    from advmoe import attacks

    budget = {"eps": cfg.eps, "norm": cfg.norm, "generator": generator}
    if name in GRADIENT_ATTACKS:
        loss = "ce" if name == "pgd_ce" else "cw"
        return functools.partial(
            attacks.pgd,
            alpha=cfg.pgd_alpha,
            steps=cfg.pgd_steps,
            random_start=True,
            loss=loss,
            restarts=cfg.pgd_restarts,
            **budget,
        )
    if name == "autoattack":
        return functools.partial(
            attacks.autoattack,
            version=cfg.autoattack_version,
            n_iter=cfg.autoattack_iters,
            n_targets=cfg.autoattack_targets,
            square_queries=cfg.autoattack_square_queries,
            **budget,
        )
    raise ValueError(f"unknown attack {name!r}; known: {[*GRADIENT_ATTACKS, 'autoattack']}")


def run_attack(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: EvalConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run :func:`make_attack` ``(name, cfg, generator)`` on one batch and return x_adv (B, C, H, W)."""
    return make_attack(name, cfg, generator)(model, x, y).detach()


class Tally:
    """Accumulates per-sample boolean vectors under named keys and reports their means.

    Example:
        >>> t = Tally()
        >>> t.add("sa", torch.tensor([True, False]))
        >>> t.add("sa", torch.tensor([True, True]))
        >>> t.mean("sa")
        0.75
    """

    def __init__(self) -> None:
        self._hits: dict[str, int] = {}
        self._counts: dict[str, int] = {}

    def add(self, key: str, mask: torch.Tensor) -> None:
        """Add a (B,) bool vector (True = the sample counts as a hit) to ``key``."""
        if mask.dim() != 1 or mask.dtype != torch.bool:
            shape = tuple(mask.shape)
            raise ValueError(f"Tally.add({key!r}): mask must be a 1-D bool tensor, got {mask.dtype} {shape}")
        self._hits[key] = self._hits.get(key, 0) + int(mask.sum())
        self._counts[key] = self._counts.get(key, 0) + mask.numel()

    def names(self) -> list[str]:
        """Keys seen so far, in insertion order."""
        return list(self._counts)

    def count(self, key: str) -> int:
        """Number of samples added under ``key``."""
        return self._counts.get(key, 0)

    def mean(self, key: str) -> float | None:
        """Fraction of hits under ``key`` in [0, 1]; None when nothing was added."""
        n = self._counts.get(key, 0)
        return self._hits[key] / n if n else None
