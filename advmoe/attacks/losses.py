"""Per-sample attack losses on logits (all return (B,) tensors; larger = more adversarial)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["ce_loss", "cw_margin_loss", "dlr_loss", "dlr_targeted_loss", "kl_loss", "resolve_loss"]


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample. logits (B, K), y (B,) -> (B,)."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def _other_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Largest logit among the classes other than y. (B, K), (B,) -> (B,)."""
    mask = F.one_hot(y, logits.shape[1]).bool()
    return logits.masked_fill(mask, float("-inf")).amax(dim=1)


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: max_{j != y} z_j - z_y (positive iff misclassified). (B, K), (B,) -> (B,)."""
    if logits.shape[1] < 2:
        raise ValueError("the CW margin needs at least 2 classes")
    z = logits.float()
    return _other_max(z, y) - z.gather(1, y[:, None]).squeeze(1)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020), untargeted.

    ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` with z sorted descending (pi1 the largest); invariant to
    shifting and rescaling the logits. Needs at least 3 classes. (B, K), (B,) -> (B,).
    """
    if logits.shape[1] < 3:
        raise ValueError("the DLR loss needs at least 3 classes")
    z = logits.float()
    zs = z.sort(dim=1, descending=True).values
    return -(z.gather(1, y[:, None]).squeeze(1) - _other_max(z, y)) / (zs[:, 0] - zs[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``.

    Needs at least 4 classes. logits (B, K), y (B,), target (B,) -> (B,).
    """
    if logits.shape[1] < 4:
        raise ValueError("the targeted DLR loss needs at least 4 classes")
    z = logits.float()
    zs = z.sort(dim=1, descending=True).values
    num = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, target[:, None]).squeeze(1)
    return -num / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)


def kl_loss(logits_adv: torch.Tensor, logits_ref: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits_ref) || softmax(logits_adv)) per sample, from log-probabilities on both sides (no
    underflow NaNs). (B, K), (B, K) -> (B,)."""
    log_p = F.log_softmax(logits_ref.float(), dim=1)
    log_q = F.log_softmax(logits_adv.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": ce_loss,
    "cw": cw_margin_loss,
    "dlr": dlr_loss,
}


def resolve_loss(loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A per-sample loss function from a name in ``LOSSES`` or a callable ``(logits, y) -> (B,) or scalar``."""
    if callable(loss):
        return loss
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]
    raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable (logits, y) -> loss, got {loss!r}")
