"""The study's configuration file: arms, profile, evaluation, comparisons and statistics, checked strictly.

A study file (``study.yaml``) has the sections ``base`` (an ``advmoe.train`` experiment config), ``arms``
(per arm a ``label`` and overrides of ``base``), ``eval``, ``comparisons`` (pairs of arm names),
``statistics`` and ``profiles`` (per profile ``seeds``, ``jobs``, ``config`` overrides of every arm and
``eval`` overrides). Unknown arm, metric or statistic names raise a ``ValueError`` listing the known ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from advmoe._config import deep_merge, load_yaml
from advmoe.train.config import ExperimentConfig

__all__ = [
    "KNOWN_METRICS",
    "KNOWN_STATISTICS",
    "arm_config",
    "deep_merge",
    "load_study",
]

# metric -> what the final evaluation measures for it
KNOWN_METRICS = {
    "sa": "clean accuracy on the test split",
    "autoattack": "AutoAttack RA at each eps (the headline)",
    "pgd": "PGD-20 (CE, step eps/4) RA at each eps",
    "research_pgd": "the research code's PGD-10 with router term, best epoch on the test split",
    "routing": "expert usage per layer and routing kept under the attacks",
    "domain_routing": "agreement between routing and the data's domain (polarity-mixed data)",
    "flops": "inference FLOPs per image (fvcore)",
}
KNOWN_STATISTICS = {
    "paired_t": "paired t-test p-value and t-interval of the per-seed differences",
    "bootstrap": "percentile bootstrap interval of the mean per-seed difference",
    "holm": "Holm-adjusted p-values over all comparisons and eps",
    "mdd": "minimum detectable difference (paired t-test, alpha 0.05, power 0.8)",
}
_SECTIONS = ("base", "arms", "eval", "comparisons", "statistics", "profiles")
_EVAL_KEYS = {"eps", "metrics", "autoattack", "test_samples", "research_pgd", "pgd", "batch_size"}
_PROFILE_KEYS = {"seeds", "jobs", "config", "eval"}


def _known(kind: str, names, known) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {kind}(s) {unknown}; known {kind}s: {list(known)}")


def load_study(path: str | Path, profile: str) -> dict[str, Any]:
    """Read and check a study file, with the profile's overrides applied.

    Args:
        path: the YAML file.
        profile: a name from its ``profiles`` section.

    Returns:
        The study dict with ``seeds``, ``jobs``, ``profile`` set, ``eval`` merged with the profile's, and the
        profile's ``config`` merged into ``base``.

    Raises:
        ValueError: a missing section, an unknown profile, arm, metric or statistic (listing the known ones),
            or an arm whose training config is invalid.
    """
    study = load_yaml(str(path))
    missing = [s for s in _SECTIONS if s not in study]
    if missing:
        raise ValueError(f"study config {str(path)!r} lacks section(s) {missing}; a study file has {list(_SECTIONS)}")
    _known("profile", [profile], study["profiles"])
    prof = study["profiles"][profile] or {}
    _known("profile key", prof, _PROFILE_KEYS)
    study["profile"] = profile
    study["seeds"] = [int(s) for s in prof.get("seeds", [0])]
    study["jobs"] = int(prof.get("jobs", 1))
    study["base"] = deep_merge(study["base"], prof.get("config"))
    study["eval"] = deep_merge(study["eval"], prof.get("eval"))
    _known("eval key", study["eval"], _EVAL_KEYS)
    _known("metric", study["eval"].get("metrics", []), KNOWN_METRICS)
    _known("statistic", study["statistics"], KNOWN_STATISTICS)
    for pair in study["comparisons"]:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(f"each comparison must be a pair [arm, arm], got {pair!r}")
        _known("arm", pair, study["arms"])
    eps = study["eval"].get("eps")
    if not isinstance(eps, list) or not eps or any(not isinstance(e, int | float) or e <= 0 for e in eps):
        raise ValueError(f"eval.eps must be a non-empty list of budgets > 0, got {eps!r}")
    for arm in study["arms"]:
        arm_config(study, arm, 0)
    return study


def arm_config(study: dict[str, Any], arm: str, seed: int) -> ExperimentConfig:
    """The validated training config of one (arm, seed) run."""
    _known("arm", [arm], study["arms"])
    override = {k: v for k, v in (study["arms"][arm] or {}).items() if k != "label"}
    return ExperimentConfig.from_dict(deep_merge(study["base"], {**override, "seed": int(seed)}))


def select_arms(study: dict[str, Any], arms: list[str] | None) -> list[str]:
    """The arms to run: ``arms`` (checked) or all of the study's."""
    if arms is None:
        return list(study["arms"])
    _known("arm", arms, study["arms"])
    return list(arms)
