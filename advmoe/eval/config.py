"""Evaluation settings (the ``eval`` section of a config file)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["EVALUATION_VERSION", "KNOWN_ATTACKS", "EvalConfig", "load_eval_config"]

KNOWN_ATTACKS = ("pgd_ce", "pgd_cw", "autoattack")

# Bumped when what evaluate() measures changes (2: stand-in examples re-scored on the real model and counted
# in ra_worst for every MoE model, the soft-routing surrogate, routing kept over attacked samples, AutoAttack
# standard with Square), so that cached results of an older evaluation are not reused (run_study's fingerprint).
EVALUATION_VERSION = 2


@dataclass
class EvalConfig:
    """What :func:`advmoe.eval.evaluate` measures and with which attacks.

    Defaults follow the threat model of the paper and its research code (L-inf, eps 8/255 on [0, 1]
    images, PGD step 2/255 as its ``--step-size-test``) but with the stronger budget that an honest
    evaluation of hard-gated models needs (docs/evaluation.md): CE and CW-margin PGD-50 with 2 restarts
    and AutoAttack, instead of the research code's 10-step PGD with a router term.

    Attributes:
        eps: perturbation budget (L-inf: max abs change per pixel; L2: max L2 norm per image).
        norm: ``"linf"`` or ``"l2"``.
        attacks: attacks whose robust accuracy is reported, from ``KNOWN_ATTACKS``: ``pgd_ce`` (PGD on
            cross-entropy), ``pgd_cw`` (PGD on the CW margin), ``autoattack``. ``ra_worst`` is the
            per-sample worst case over all of them, the router attack, and the examples the PGD attacks
            among them make on the stand-ins below (frozen routing, fixed pathways, soft routing), every
            example scored on the real model (docs/evaluation.md).
        pgd_steps: PGD iterations.
        pgd_alpha: PGD step size (research code: 2/255).
        pgd_restarts: random restarts per PGD attack; the per-sample worst restart counts.
        autoattack_version: ``"standard"`` (APGD-CE, APGD-T 9 targets, Square 5000 queries) or ``"fast"``
            (APGD-CE, APGD-T 3 targets, 50 iterations, no Square); see ``advmoe.attacks.autoattack``.
        autoattack_iters: override the iterations of each APGD attack of that version (None: its default).
        autoattack_targets: override the number of APGD-T target classes (None: the version's default).
        autoattack_square_queries: override the Square Attack's queries (0: none; None: the version's
            default). Any override shows in the variant name (``result["autoattack_variant"]``, e.g.
            ``"autoattack-fast-25it"``), which every report row of AutoAttack carries.
        router_attack_steps: steps of the router-targeted attack used for router robustness (0: skip it).
        router_robustness: report, per attack, the share of the attacked samples (classified correctly when
            clean and changed by the attack, ``x_adv != x``) whose routing is unchanged.
        frozen_routing: run the PGD attacks with routing frozen to each sample's clean choice; report their
            RA on that frozen model (expert robustness alone) and re-score the same examples on the real,
            routed model (counted in ``ra_worst``).
        pathway_worst_case: run the PGD attacks with every sample forced through one pathway, for each
            pathway, and score the examples on the real model (counted in ``ra_worst``). With a model-level
            top-1 router these are all P = E pathways; otherwise (per-layer routers, top-k > 1) the E
            "uniform" pathways (every MoE layer on expert p, or experts p..p+k-1 mod E).
        max_pathways: run the pathway attacks only when ``2 <= P <= max_pathways`` (each pathway costs the
            PGD attacks once more).
        soft_routing: attack a soft-routing surrogate end to end with the PGD attacks (every MoE layer mixes
            its experts with the router's softmax, ``advmoe.attacks.soft_routing``) and score the examples
            on the real, hard-routed model (counted in ``ra_worst``).
        soft_routing_temperature: relative temperature of that softmax: per batch and MoE layer,
            ``T = soft_routing_temperature x`` the median gap between the layer's best and second-best router
            score on the clean batch (``advmoe.attacks.calibrated_temperatures``), > 0.
        max_samples: evaluate at most this many samples (None: all).
        batch_size: evaluation batch size (used by the CLI when it builds the loader).
        seed: seed of the attacks' random starts.
        check_model: run ``advmoe.attacks.check_evaluation_setup`` on the first batch (warnings for
            probability outputs, zero input gradients, randomness), and the result-level checks of
            :func:`advmoe.eval.evaluate` (robust above clean accuracy, pathway attacks beating the plain ones).
        progress: show a tqdm progress bar over the evaluation batches.
    """

    eps: float = 8 / 255
    norm: str = "linf"
    attacks: list[str] = field(default_factory=lambda: ["pgd_ce", "pgd_cw", "autoattack"])
    pgd_steps: int = 50
    pgd_alpha: float = 2 / 255
    pgd_restarts: int = 2
    autoattack_version: str = "standard"
    autoattack_iters: int | None = None
    autoattack_targets: int | None = None
    autoattack_square_queries: int | None = None
    router_attack_steps: int = 10
    router_robustness: bool = True
    frozen_routing: bool = True
    pathway_worst_case: bool = True
    max_pathways: int = 8
    soft_routing: bool = True
    soft_routing_temperature: float = 0.1
    max_samples: int | None = None
    batch_size: int = 128
    seed: int = 0
    check_model: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.attacks, str):
            self.attacks = [self.attacks]
        self.attacks = list(self.attacks)
        unknown = [a for a in self.attacks if a not in KNOWN_ATTACKS]
        if unknown:
            raise ValueError(f"eval.attacks: unknown attack(s) {unknown}; known: {list(KNOWN_ATTACKS)}")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"eval.norm must be 'linf' or 'l2', got {self.norm!r}")
        if not self.eps >= 0:
            raise ValueError(f"eval.eps must be >= 0, got {self.eps}")
        for name in ("pgd_steps", "router_attack_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        if self.pgd_restarts < 1:
            raise ValueError(f"eval.pgd_restarts must be >= 1, got {self.pgd_restarts}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        for name in ("autoattack_iters", "autoattack_targets"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"eval.{name} must be an int >= 1 or None, got {value!r}")
        sq = self.autoattack_square_queries
        if sq is not None and (isinstance(sq, bool) or not isinstance(sq, int) or sq < 0):
            raise ValueError(f"eval.autoattack_square_queries must be an int >= 0 or None, got {sq!r}")
        if sq and self.norm != "linf":
            raise ValueError("eval.autoattack_square_queries > 0 needs norm 'linf' (the Square Attack is L-inf only)")
        temp = self.soft_routing_temperature
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not (math.isfinite(temp) and temp > 0):
            raise ValueError(f"eval.soft_routing_temperature must be a finite number > 0, got {temp!r}")
        if self.max_pathways < 2:
            raise ValueError(f"eval.max_pathways must be >= 2, got {self.max_pathways}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"eval.max_samples must be >= 1 or None, got {self.max_samples}")
        if self.autoattack_version not in ("standard", "fast"):
            raise ValueError(f"eval.autoattack_version must be 'standard' or 'fast', got {self.autoattack_version!r}")


def load_eval_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> EvalConfig:
    """Read an :class:`EvalConfig` from YAML (or start from defaults) and apply ``key=value`` overrides.

    The counterpart of :func:`advmoe.train.load_experiment_config` for ``advmoe eval``.

    Args:
        path: YAML file holding an ``EvalConfig`` mapping, or a full experiment config whose ``eval`` section
            is used; None for the defaults.
        overrides: strings such as ``"max_samples=500"`` or ``"eval.max_samples=500"`` (an ``eval.`` prefix is
            dropped); values are parsed as YAML.

    Returns:
        The validated :class:`EvalConfig`.

    Raises:
        ValueError: an unknown key or a bad value (the message names it).
    """
    from advmoe._config import apply_overrides, from_dict, load_yaml

    data = load_yaml(path) if path else {}
    if "eval" in data and isinstance(data["eval"], dict):
        data = data["eval"]
    overrides = [o[len("eval.") :] if o.startswith("eval.") else o for o in overrides]
    return from_dict(EvalConfig, apply_overrides(data, overrides), "eval")
