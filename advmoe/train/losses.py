"""Training losses, computed stably from logits.

Every KL term is ``advmoe.attacks.losses.kl_loss`` (the project's one KL helper) averaged over the batch: it
takes log-probabilities on both sides, so a target probability that underflows to 0 in float32 never produces
``0 * log 0`` NaNs (the research code's ``KLDivLoss(log_softmax(adv), softmax(nat))`` does, which is how its
router goes NaN).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from advmoe.attacks.losses import kl_loss

__all__ = ["NonFiniteLossError", "research_router_loss", "trades_loss"]


class NonFiniteLossError(FloatingPointError):
    """A training loss was NaN or infinite; the run stops before the bad update is applied."""


def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """TRADES objective: CE(f(x), y) + beta * KL(f(x) || f(x_adv)).

    Args:
        logits_nat: (B, C) logits on clean inputs.
        logits_adv: (B, C) logits on the TRADES adversarial inputs.
        y: (B,) int64 labels.
        beta: weight of the robustness (KL) term.

    Returns:
        Scalar loss.
    """
    return F.cross_entropy(logits_nat, y) + beta * kl_loss(logits_adv, logits_nat).mean()


def research_router_loss(
    router_nat: Mapping[str, torch.Tensor],
    router_adv: Mapping[str, torch.Tensor],
    y: torch.Tensor,
    ce_weight: float,
    kl_weight: float,
) -> torch.Tensor:
    """The research code's router-step loss, averaged over routers and computed stably.

    For each router r with E outputs: ``ce_weight * CE(s_r(x), y mod E) + kl_weight * KL(softmax(s_r(x)) ||
    softmax(s_r(x_adv)))`` (research ``train_moe.py`` line 143: ``args.alpha * CE + args.beta * KL``, both 6
    by default). The label ``y mod E`` assigns classes to experts round-robin (the routing supervision);
    the KL term asks the routing scores to survive the attack.

    Args:
        router_nat: router name -> (B, E) router logits on clean inputs.
        router_adv: router name -> (B, E) router logits on adversarial inputs (same keys).
        y: (B,) int64 labels.
        ce_weight: weight of the supervision CE (``train.router_alpha``, research ``--alpha``).
        kl_weight: weight of the router KL (``train.beta``, research ``--beta``).

    Returns:
        Scalar loss.

    Raises:
        ValueError: no routers (a dense model), or the two dicts have different keys.
    """
    if not router_nat:
        raise ValueError("router_loss='research' needs a model with routers (router_logits is empty)")
    if set(router_nat) != set(router_adv):
        raise ValueError(f"router keys differ: {sorted(router_nat)} vs {sorted(router_adv)}")
    total = 0.0
    for name, scores in router_nat.items():
        num_experts = scores.shape[1]
        total = total + ce_weight * F.cross_entropy(scores.float(), y % num_experts)
        total = total + kl_weight * kl_loss(router_adv[name], scores).mean()
    return total / len(router_nat)
