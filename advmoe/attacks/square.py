"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf: a score-based black-box attack.

It needs only the model's outputs, never its gradients, so it is the standard check against gradient
masking (a hard top-k gate, rounding, randomness): when it fools samples that the gradient attacks could
not, the gradient-based robust accuracy is overstated. Per query and per sample it redraws one square
window of the perturbation as +-eps per channel and keeps the change if the margin loss drops. Own
implementation written from the paper.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from advmoe.attacks._common import check_attack_args, frozen_params

__all__ = ["square_attack", "square_fraction"]

# the share of pixels in a window is halved after these fractions of 10000 queries (the paper's schedule)
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init: float, query: int, n_queries: int) -> float:
    """Share of the image covered by the window at ``query`` (of ``n_queries``), halving on the schedule."""
    it = int(query / max(n_queries, 1) * 10000)
    return p_init / 2 ** sum(it > h for h in _HALVINGS)


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per sample (negative iff misclassified)."""
    z = logits.float()
    other = z.masked_fill(torch.nn.functional.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(dim=1)
    return z.gather(1, y[:, None]).squeeze(1) - other


def square_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    n_queries: int = 5000,
    p_init: float = 0.8,
    norm: str = "linf",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted L-inf Square Attack on the margin loss.

    Args:
        model: module mapping x to logits (B, K); only forward passes are made (no gradients at all).
        x: (B, C, H, W) clean inputs in [0, 1].
        y: (B,) int64 labels.
        eps: L-inf budget.
        n_queries: forward passes per sample (the first one is the stripe initialisation).
        p_init: initial share of the image that one square covers (0.8 in AutoAttack's standard setting).
        norm: only ``"linf"`` is implemented.
        generator: random generator (window positions and signs), on any device.

    Returns:
        (B, C, H, W) points in the eps-ball and [0, 1]: misclassified where the attack succeeded, else the
        lowest-margin point found.
    """
    check_attack_args(model, x, y, eps, None, n_queries, norm)
    if norm != "linf":
        raise ValueError("square_attack: only norm='linf' is implemented")
    if x.dim() != 4:
        raise ValueError(f"square_attack: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
    x = x.detach()
    b, c, h, w = x.shape
    if b == 0 or eps == 0 or n_queries == 0:
        return x.clone()

    dev = generator.device if generator is not None else x.device

    def rand_sign(*shape: int) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=generator, device=dev).float() * 2 - 1).to(x.device, x.dtype)

    with frozen_params(model), torch.no_grad():
        x_best = (x + eps * rand_sign(b, c, 1, w)).clamp(0.0, 1.0)  # vertical stripes
        margin = _margin(model(x_best), y)
        for query in range(1, n_queries):
            active = (margin > 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            p = square_fraction(p_init, query, n_queries)
            s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
            vh = int(torch.randint(0, h - s + 1, (1,), generator=generator, device=dev))
            vw = int(torch.randint(0, w - s + 1, (1,), generator=generator, device=dev))
            xa, xb = x[active], x_best[active]
            delta = xb - xa
            delta[:, :, vh : vh + s, vw : vw + s] = eps * rand_sign(active.numel(), c, 1, 1)
            x_new = torch.min(torch.max(xa + delta, xa - eps), xa + eps).clamp(0.0, 1.0)
            m_new = _margin(model(x_new), y[active])
            better = m_new < margin[active]
            x_best[active[better]] = x_new[better]
            margin[active[better]] = m_new[better]
    return x_best
