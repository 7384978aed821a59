"""AutoAttack-style ensemble for final robustness evaluation (own implementation, no torchattacks).

``version="standard"``: APGD-CE (100 iterations), then APGD-T (targeted DLR, the 9 most likely wrong
classes, 100 iterations each), then the Square Attack (5000 queries, score based, no gradients), as in
Croce & Hein's standard AutoAttack without FAB-T. ``version="fast"``: APGD-CE (50 iterations) then APGD-T
(3 targets, 50 iterations), no Square. Each attack only runs on the samples that are still classified
correctly. Square warns (``EvaluationWarning``) if it fools samples that APGD could not: a sign of
gradient masking. It is L-inf only here, so an L2 run has no Square (its variant name says "nosquare").
FAB-T, the remaining attack of the standard suite, is not included (in published evaluations it rarely
lowers robust accuracy below APGD-CE + APGD-T + Square).

Every run has a variant name (:func:`autoattack_variant`): ``"autoattack-standard"`` for the standard
budget above, and a suffix for every departure from the version's budget, e.g. ``"autoattack-fast-25it"``
(fast with 25 iterations per APGD attack), ``"autoattack-standard-nosquare"``, ``"autoattack-fast-1t"``
(1 APGD-T target), ``"autoattack-fast-square1000"``. Reports name the variant in every row.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from advmoe.attacks._common import check_attack_args, frozen_params
from advmoe.attacks.apgd import apgd, apgd_targeted
from advmoe.attacks.checks import check_black_box
from advmoe.attacks.square import square_attack

__all__ = ["SQUARE_QUERIES", "VERSIONS", "autoattack", "autoattack_variant", "resolve_square_queries"]

# version -> (APGD-CE iterations, APGD-T iterations, APGD-T targets)
VERSIONS = {"standard": (100, 100, 9), "fast": (50, 50, 3)}
# version -> Square Attack queries of that version (L-inf; 0: no Square)
SQUARE_QUERIES = {"standard": 5000, "fast": 0}


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {sorted(VERSIONS)}, got {version!r}")


def resolve_square_queries(version: str = "standard", norm: str = "linf", square_queries: int | None = None) -> int:
    """The Square Attack queries a run makes: ``square_queries`` if given, else the version's default.

    Args:
        version: ``"standard"`` (5000 queries) or ``"fast"`` (0).
        norm: ``"linf"`` or ``"l2"``; Square is L-inf only, so the default is 0 for L2.
        square_queries: an explicit number of queries (>= 0), or None for the default.

    Returns:
        The number of queries (0: no Square).
    """
    _check_version(version)
    if square_queries is None:
        return SQUARE_QUERIES[version] if norm == "linf" else 0
    if isinstance(square_queries, bool) or not isinstance(square_queries, int) or square_queries < 0:
        raise ValueError(f"square_queries must be an int >= 0 or None, got {square_queries!r}")
    return square_queries


def autoattack_variant(
    version: str = "standard",
    norm: str = "linf",
    n_iter: int | None = None,
    n_targets: int | None = None,
    square_queries: int | None = None,
) -> str:
    """The name of an AutoAttack run with these arguments (the arguments of :func:`autoattack`).

    ``"autoattack-<version>"`` when the run uses exactly the version's budget, otherwise with one suffix
    per departure: ``-<n>it`` (APGD iterations), ``-<n>t`` (APGD-T targets), ``-nosquare`` or
    ``-square<n>`` (Square queries). Example: ``autoattack_variant("fast", n_iter=25)`` is
    ``"autoattack-fast-25it"``; a standard run on L2 is ``"autoattack-standard-nosquare"``.

    Returns:
        The variant name.

    Raises:
        ValueError: unknown version or a bad ``square_queries``.
    """
    _check_version(version)
    it_ce, it_t, targets = VERSIONS[version]
    name = f"autoattack-{version}"
    if n_iter is not None and not (n_iter == it_ce == it_t):
        name += f"-{n_iter}it"
    if n_targets is not None and n_targets != targets:
        name += f"-{n_targets}t"
    queries = resolve_square_queries(version, norm, square_queries)
    if queries != SQUARE_QUERIES[version]:
        name += "-nosquare" if queries == 0 else f"-square{queries}"
    return name


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1) == y


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    n_iter: int | None = None,
    n_targets: int | None = None,
    generator: torch.Generator | None = None,
    verbose: bool = False,
    square_queries: int | None = None,
) -> torch.Tensor:
    """Runs APGD-CE, then APGD-T, then Square (standard) on the survivors; returns the adversarial batch.

    Args:
        model: module mapping x to logits (B, K), in eval mode (the mode is not changed; a model in
            train mode triggers a warning); ``requires_grad`` restored, no ``.grad`` written.
        x: (B, ...) clean inputs in [0, 1].
        y: (B,) int64 labels.
        eps: budget in ``norm`` (L-inf 8/255 is the usual CIFAR threat model).
        norm: ``"linf"`` or ``"l2"``.
        version: ``"standard"`` or ``"fast"`` (see the module docstring).
        n_iter: override the iterations of both attacks.
        n_targets: override the number of APGD-T target classes (at most K - 1).
        generator: random generator for the starts.
        verbose: print the robust accuracy after each attack.
        square_queries: queries of a final Square Attack (L-inf only; 0: skip). None: the version's
            default, 5000 for ``"standard"`` (the standard suite's) and 0 for ``"fast"``; 0 for L2.

    Returns:
        (B, ...) inputs: for every sample the attack fooled, the adversarial point (in the eps-ball and
        [0, 1]); for the others (robust, or already misclassified when clean) the clean input.
        Robust accuracy = ``(model(x_adv).argmax(1) == y).float().mean()``.
    """
    check_attack_args(model, x, y, eps, None, n_iter, norm)
    _check_version(version)
    if n_targets is not None and (isinstance(n_targets, bool) or not isinstance(n_targets, int) or n_targets < 1):
        raise ValueError(f"n_targets must be an int >= 1, got {n_targets!r}")
    if model.training:
        warnings.warn("autoattack: the model is in train mode; call model.eval() first", UserWarning, stacklevel=2)
    explicit = square_queries is not None
    square_queries = resolve_square_queries(version, norm, square_queries)
    if square_queries and norm != "linf":
        raise ValueError("square_queries > 0 needs norm='linf' (the Square Attack here is L-inf only)")
    if square_queries and x.dim() != 4:
        if explicit:
            raise ValueError(f"square_queries > 0 needs (B, C, H, W) images, got x of shape {tuple(x.shape)}")
        warnings.warn(
            f"autoattack: the Square Attack needs (B, C, H, W) images, x has shape {tuple(x.shape)}; running "
            f"{autoattack_variant(version, norm, n_iter, n_targets, 0)} (no Square)",
            UserWarning,
            stacklevel=2,
        )
        square_queries = 0
    it_ce, it_t, targets = VERSIONS[version]
    if n_iter is not None:
        it_ce = it_t = n_iter
    if n_targets is not None:
        targets = n_targets
    x = x.detach()
    x_adv = x.clone()
    if x.shape[0] == 0:
        return x_adv
    with frozen_params(model):
        with torch.no_grad():
            logits = model(x)
        num_classes = logits.shape[1]
        robust = logits.argmax(dim=1) == y
        order = logits.argsort(dim=1, descending=True)  # targets: the most likely wrong classes

        def run(name, attack) -> None:
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                return
            adv = attack(idx)
            fooled = ~_correct(model, adv, y[idx])
            x_adv[idx[fooled]] = adv[fooled]
            robust[idx[fooled]] = False
            if verbose:
                print(f"autoattack: after {name}: robust accuracy {robust.float().mean().item():.4f}")

        run("APGD-CE", lambda idx: apgd(model, x[idx], y[idx], eps, norm, it_ce, "ce", 1, generator))
        if num_classes >= 4:
            for t in range(1, min(targets, num_classes - 1) + 1):
                run(
                    f"APGD-T target {t}",
                    lambda idx, t=t: apgd_targeted(model, x[idx], y[idx], order[idx, t], eps, norm, it_t, 1, generator),
                )
        elif num_classes >= 2:
            warnings.warn(
                f"autoattack: {num_classes} classes are too few for targeted DLR; running APGD on the CW margin "
                "instead of APGD-T",
                UserWarning,
                stacklevel=2,
            )
            run("APGD-CW", lambda idx: apgd(model, x[idx], y[idx], eps, norm, it_t, "cw", 1, generator))
        if square_queries:
            after_gradient = robust.clone()
            run("Square", lambda idx: square_attack(model, x[idx], y[idx], eps, square_queries, generator=generator))
            check_black_box(after_gradient, robust, name="the Square Attack")
    return x_adv
