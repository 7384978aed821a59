"""AutoAttack-style ensemble for final robustness evaluation (own implementation, no torchattacks).

``version="standard"``: APGD-CE (100 iterations) then APGD-T (targeted DLR, the 9 most likely wrong
classes, 100 iterations each), as in the first two attacks of Croce & Hein's standard AutoAttack.
``version="fast"``: APGD-CE (50 iterations) then APGD-T (3 targets, 50 iterations). Each attack only runs
on the samples that are still classified correctly. ``square_queries > 0`` adds the Square Attack (score
based, no gradients; the standard suite uses 5000 queries) on the survivors and warns
(``EvaluationWarning``) if it fools samples that APGD could not: a sign of gradient masking. FAB-T, the
remaining attack of the standard suite, is not included (in published evaluations it rarely lowers
robust accuracy below APGD-CE + APGD-T).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from advmoe.attacks._common import check_attack_args, frozen_params
from advmoe.attacks.apgd import apgd, apgd_targeted
from advmoe.attacks.checks import check_black_box
from advmoe.attacks.square import square_attack

__all__ = ["VERSIONS", "autoattack"]

# version -> (APGD-CE iterations, APGD-T iterations, APGD-T targets)
VERSIONS = {"standard": (100, 100, 9), "fast": (50, 50, 3)}


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
    square_queries: int = 0,
) -> torch.Tensor:
    """Runs APGD-CE, then APGD-T on the samples that survived, and returns the adversarial batch.

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
        square_queries: queries of a final Square Attack (L-inf only; 0: skip, 5000: the standard suite's).

    Returns:
        (B, ...) inputs: for every sample the attack fooled, the adversarial point (in the eps-ball and
        [0, 1]); for the others (robust, or already misclassified when clean) the clean input.
        Robust accuracy = ``(model(x_adv).argmax(1) == y).float().mean()``.
    """
    check_attack_args(model, x, y, eps, None, n_iter, norm)
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {sorted(VERSIONS)}, got {version!r}")
    if n_targets is not None and (isinstance(n_targets, bool) or not isinstance(n_targets, int) or n_targets < 1):
        raise ValueError(f"n_targets must be an int >= 1, got {n_targets!r}")
    if model.training:
        warnings.warn("autoattack: the model is in train mode; call model.eval() first", UserWarning, stacklevel=2)
    if isinstance(square_queries, bool) or not isinstance(square_queries, int) or square_queries < 0:
        raise ValueError(f"square_queries must be an int >= 0, got {square_queries!r}")
    if square_queries and norm != "linf":
        raise ValueError("square_queries > 0 needs norm='linf' (the Square Attack here is L-inf only)")
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
