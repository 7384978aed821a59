"""Statistics of paired per-seed differences: t-test, t- and bootstrap intervals, Holm, detectable difference.

All functions take the per-seed differences (first arm minus second arm, same seed) as plain floats.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["compare", "holm", "min_detectable_difference"]


def min_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The true mean difference a two-sided paired t-test detects with ``power``, given the spread.

    ``(t(1 - alpha/2, n-1) + t(power, n-1)) * sd / sqrt(n)`` (the usual t approximation of the power of a
    one-sample t-test on the differences).

    Args:
        sd: standard deviation of the per-seed differences (ddof 1).
        n: number of pairs.
        alpha: test level.
        power: wanted power.

    Returns:
        The difference (same unit as ``sd``), or None for fewer than 2 pairs.
    """
    if n < 2:
        return None
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n))


def compare(diffs: list[float], seed: int = 0, resamples: int = 10_000) -> dict[str, float | int | None]:
    """Summary of paired differences.

    Args:
        diffs: per-seed differences.
        seed: seed of the bootstrap resampling.
        resamples: bootstrap resamples.

    Returns:
        ``n``, ``mean``, ``sd``, ``t_ci`` [lo, hi] (95% paired t-interval), ``boot_ci`` [lo, hi] (95%
        percentile bootstrap of the mean), ``p`` (two-sided paired t-test; 1.0 when all differences are
        0), ``mdd`` (:func:`min_detectable_difference`). Values are None where n is too small.
    """
    d = np.asarray([float(v) for v in diffs], dtype=np.float64)
    n = int(d.size)
    out: dict = {"n": n, "mean": None, "sd": None, "t_ci": None, "boot_ci": None, "p": None, "mdd": None}
    if n == 0:
        return out
    out["mean"] = float(d.mean())
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    out["sd"] = sd
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    out["t_ci"] = [out["mean"] - half, out["mean"] + half]
    if sd == 0.0:
        out["p"] = 1.0 if out["mean"] == 0.0 else 0.0
    else:
        out["p"] = float(stats.ttest_1samp(d, 0.0).pvalue)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    out["boot_ci"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    out["mdd"] = min_detectable_difference(sd, n)
    return out


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None entries stay None and do not count)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
