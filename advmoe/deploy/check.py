"""Checking a deployed model against its source: logits within tolerance, except near-tie routing.

BatchNorm folding (and router folding) change float rounding. A sample whose best two router scores are
closer than that noise may take the other expert in the deployed model; its logits then legitimately
differ. ``compare_deployed`` counts those samples separately instead of hiding them in a loose tolerance.
"""

from __future__ import annotations

import torch
from torch import nn

from advmoe.nn import forward_with_aux


@torch.no_grad()
def routing_margin(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B,) smallest gap between the best and second-best router score of each sample over all routers.

    ``inf`` for a dense model or a single expert.
    """
    _, aux = forward_with_aux(model, x)
    margin = torch.full((x.shape[0],), float("inf"), dtype=torch.float64, device=x.device)
    for scores in aux.router_logits.values():
        if scores.shape[1] < 2:
            continue
        top2 = scores.double().topk(2, dim=1).values
        margin = torch.minimum(margin, top2[:, 0] - top2[:, 1])
    return margin


@torch.no_grad()
def compare_deployed(
    model: nn.Module, deployed: nn.Module, x: torch.Tensor, rtol: float = 1e-4, noise: float = 1e-4
) -> dict[str, float]:
    """Compares the deployed model's logits with the source's on x.

    Args:
        model: the eval-mode source model.
        deployed: ``to_sparse(model, ...)``.
        x: (B, C, H, W) images.
        rtol: allowed max |difference| relative to max(1, max |source logit|).
        noise: a routing margin below ``noise * max(1, max |score|)`` counts as a float-noise tie.

    Returns:
        {"n", "max_rel_diff" (over samples within tolerance or not tied), "mismatched" (samples above
        tolerance), "near_ties" (mismatched samples whose routing margin is below the noise), "ok" (every
        mismatched sample is a near tie)}.
    """
    ref, out = model(x).double(), deployed(x).double()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    per_sample = (ref - out).abs().amax(dim=1) / scale if ref.numel() else ref.new_zeros(0)
    bad = per_sample > rtol
    near = torch.zeros_like(bad)
    if bad.any():
        margin = routing_margin(model, x)
        near = bad & (margin <= noise * scale)
    ok_rows = ~near
    return {
        "n": x.shape[0],
        "max_rel_diff": per_sample[ok_rows].max().item() if ok_rows.any() else 0.0,
        "mismatched": int(bad.sum()),
        "near_ties": int(near.sum()),
        "ok": bool((bad == near).all()),
    }
