"""``evaluate(model, data, cfg) -> dict``: standard and robust accuracy, routing robustness, expert usage.

Conventions (README "Metrics"): accuracies and shares are fractions in [0, 1] over the evaluated samples.
A sample is robust under an attack when it is classified correctly both clean and attacked (AutoAttack's
convention), so every robust accuracy is at most SA. ``ra_worst`` is the per-sample AND over every attack
run (including the router attack and the pathway attacks), i.e. the accuracy against the best attack per
sample. The model is evaluated in eval mode; its previous mode is restored afterwards.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advmoe._config import from_dict, to_dict
from advmoe.eval.batches import iter_batches, model_device
from advmoe.eval.config import EvalConfig
from advmoe.eval.metrics import ATTACK_LABELS, GRADIENT_ATTACKS, Tally, correct, run_attack
from advmoe.eval.routing_metrics import ALL_LAYERS, UsageCounter, layer_num_experts, routing_of, tally_unchanged

__all__ = ["evaluate"]


def _caught(fn, *args) -> list[str]:
    """Run ``fn(*args)``, re-issue its warnings, and return their messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return [str(w.message) for w in caught]


class _Evaluator:
    """State of one evaluation: the tallies and usage counters filled batch by batch."""

    def __init__(self, model: nn.Module, cfg: EvalConfig, device: torch.device) -> None:
        from advmoe.nn import is_moe, num_pathways

        self.model, self.cfg, self.device = model, cfg, device
        self.moe = is_moe(model)
        self.pathways = num_pathways(model) if self.moe else 1
        self.grad_attacks = [a for a in cfg.attacks if a in GRADIENT_ATTACKS]
        self.run_router_attack = self.moe and cfg.router_robustness and cfg.router_attack_steps > 0
        self.run_frozen = self.moe and cfg.frozen_routing and bool(self.grad_attacks)
        self.run_pathways = (
            self.moe
            and cfg.pathway_worst_case
            and bool(self.grad_attacks)
            and self.pathways is not None
            and 2 <= self.pathways <= cfg.max_pathways
        )
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.tally = Tally()
        experts = layer_num_experts(model) if self.moe else {}
        names = ["clean", *cfg.attacks] + (["router_attack"] if self.run_router_attack else [])
        self.usage = {name: UsageCounter(experts) for name in names}
        self.num_experts = experts

    def _attacked(self, name: str, x_adv: torch.Tensor, y: torch.Tensor, clean_routing) -> torch.Tensor:
        """Tally routing changes of ``x_adv``; return (B,) "still correct" flags."""
        if not self.moe:
            return correct(self.model, x_adv, y)
        logits, routing = routing_of(self.model, x_adv)
        if self.cfg.router_robustness:
            tally_unchanged(self.tally, f"router/{name}", clean_routing, routing)
        self.usage[name].add(routing)
        return logits.argmax(dim=1) == y

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from advmoe.nn import frozen_routing

        cfg, model = self.cfg, self.model
        if self.moe:
            logits, routing = routing_of(model, x)
            self.usage["clean"].add(routing)
        else:
            with torch.no_grad():
                logits, routing = model(x), {}
        clean_ok = logits.argmax(dim=1) == y
        self.tally.add("sa", clean_ok)
        worst = clean_ok.clone()
        for name in cfg.attacks:
            x_adv = run_attack(name, model, x, y, cfg, self.generator)
            ok = clean_ok & self._attacked(name, x_adv, y, routing)
            self.tally.add(f"ra/{name}", ok)
            worst &= ok
        if self.run_router_attack:
            from advmoe.attacks import router_attack

            x_adv = router_attack(
                model,
                x,
                eps=cfg.eps,
                alpha=cfg.pgd_alpha,
                steps=cfg.router_attack_steps,
                norm=cfg.norm,
                generator=self.generator,
            ).detach()
            ok = clean_ok & self._attacked("router_attack", x_adv, y, routing)
            self.tally.add("ra/router_attack", ok)
            worst &= ok
        if self.run_frozen:  # attack and evaluate the experts along the clean routing: expert robustness alone
            ok = clean_ok.clone()
            with frozen_routing(model, routing):
                for name in self.grad_attacks:
                    ok &= correct(model, run_attack(name, model, x, y, cfg, self.generator), y)
            self.tally.add("ra_frozen_routing", ok)
        if self.run_pathways:  # attack each fixed pathway, judge on the real (routed) model
            all_ok = clean_ok.clone()
            for p in range(self.pathways):
                ok = clean_ok.clone()
                for name in self.grad_attacks:
                    with frozen_routing(model, p):
                        x_adv = run_attack(name, model, x, y, cfg, self.generator)
                    ok &= correct(model, x_adv, y)
                self.tally.add(f"ra_pathway/{p}", ok)
                all_ok &= ok
            self.tally.add("ra_pathway_worst", all_ok)
            worst &= all_ok
        self.tally.add("ra_worst", worst)

    def _router_robustness(self) -> dict[str, Any] | None:
        if not (self.moe and self.cfg.router_robustness):
            return None
        out = {}
        for name in self.usage:
            if name == "clean":
                continue
            prefix = f"router/{name}/"
            per_layer = {k[len(prefix) :]: self.tally.mean(k) for k in self.tally.names() if k.startswith(prefix)}
            overall = per_layer.pop(ALL_LAYERS, None)
            out[name] = {"all_layers": overall, "per_layer": per_layer}
        return out

    def result(self, elapsed: float) -> dict[str, Any]:
        t, cfg = self.tally, self.cfg
        labels = {
            "pgd_ce": {"steps": cfg.pgd_steps},
            "pgd_cw": {"steps": cfg.pgd_steps},
            "autoattack": {"version": cfg.autoattack_version, "detail": _autoattack_detail(cfg)},
            "router_attack": {"steps": cfg.router_attack_steps},
        }
        ra_names = [*cfg.attacks] + (["router_attack"] if self.run_router_attack else [])
        return {
            "num_samples": t.count("sa"),
            "model": {"moe": self.moe, "num_pathways": self.pathways, "num_experts": self.num_experts},
            "config": to_dict(cfg),
            "attack_labels": {n: ATTACK_LABELS[n].format(**labels[n]) for n in ra_names},
            "sa": t.mean("sa"),
            "ra": {name: t.mean(f"ra/{name}") for name in ra_names},
            "ra_worst": t.mean("ra_worst"),
            "ra_frozen_routing": t.mean("ra_frozen_routing") if self.run_frozen else None,
            "ra_pathway": {str(p): t.mean(f"ra_pathway/{p}") for p in range(self.pathways)}
            if self.run_pathways
            else None,
            "ra_pathway_worst": t.mean("ra_pathway_worst") if self.run_pathways else None,
            "router_robustness": self._router_robustness(),
            "expert_usage": {name: c.as_dict() for name, c in self.usage.items()} if self.moe else None,
            "warnings": [],
            "time_s": round(elapsed, 3),
            "device": str(self.device),
        }


def _autoattack_detail(cfg: EvalConfig) -> str:
    parts = []
    if cfg.autoattack_iters is not None:
        parts.append(f"{cfg.autoattack_iters} iterations")
    if cfg.autoattack_targets is not None:
        parts.append(f"{cfg.autoattack_targets} targets")
    return ", " + ", ".join(parts) if parts else ""


def _result_warnings(result: dict[str, Any]) -> list[str]:
    """Honest-evaluation checks on the finished numbers (gradient masking signs)."""
    msgs = []
    grad = [result["ra"][a] for a in GRADIENT_ATTACKS if a in result["ra"]]
    if result["ra_pathway_worst"] is not None and grad and result["ra_pathway_worst"] < min(grad) - 0.01:
        msgs.append(
            f"attacks with fixed pathways reach RA {result['ra_pathway_worst']:.3f}, below the plain gradient "
            f"attacks' {min(grad):.3f}: the hard routing gate masks gradients; report ra_worst, not ra/pgd_*"
        )
    aa = result["ra"].get("autoattack")
    if aa is not None and grad and aa < min(grad) - max(0.05, 2 / max(1, result["num_samples"])):
        msgs.append(f"AutoAttack RA {aa:.3f} is far below PGD RA {min(grad):.3f}: PGD is weak on this model")
    attacked = [v for v in result["ra"].values() if v is not None]
    enough = result["config"]["eps"] > 0 and result["num_samples"] >= 20 and result["sa"]
    if attacked and enough and all(v == result["sa"] for v in attacked):
        msgs.append("no attack changed a single prediction: check for zero or masked input gradients")
    return msgs


def evaluate(model: nn.Module, data: Any, cfg: EvalConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate clean and robust accuracy, routing robustness and expert usage of ``model``.

    Args:
        model: a classifier on [0, 1] inputs returning logits (B, classes); dense or MoE (``advmoe.nn``).
        data: ``(x (N, C, H, W), y (N,))`` tensors, a ``Dataset`` of ``(x, y)`` samples, or an iterable of
            batches (e.g. a ``DataLoader``); batches are moved to the model's device.
        cfg: an :class:`EvalConfig`, a dict of its fields, or None for the defaults.

    Returns:
        A JSON-able dict: ``sa``, ``ra`` {attack: RA}, ``ra_worst``, ``ra_frozen_routing``, ``ra_pathway``
        {pathway: RA}, ``ra_pathway_worst``, ``router_robustness`` {attack: {"all_layers", "per_layer"}},
        ``expert_usage`` {"clean" | attack: {layer: counts per expert}}, ``warnings``, ``num_samples``,
        ``time_s`` and the config; MoE-only entries are None for dense models.

    Raises:
        ValueError: no samples in ``data``, or an invalid config.
    """
    cfg = from_dict(EvalConfig, cfg, "eval")
    device = model_device(model)
    batches, total = iter_batches(data, cfg.batch_size, cfg.max_samples)
    previous = [(m, m.training) for m in model.modules()]
    notes = []
    if model.training and cfg.check_model:
        from advmoe.attacks import EvaluationWarning

        notes.append("model was in train mode; evaluated in eval mode (its mode is restored afterwards)")
        warnings.warn(notes[-1], EvaluationWarning, stacklevel=2)
    model.eval()
    start = time.perf_counter()
    try:
        ev = _Evaluator(model, cfg, device)
        from tqdm.auto import tqdm

        bar = tqdm(batches, total=total, desc="eval", disable=not cfg.progress, leave=False)
        for i, (x, y) in enumerate(bar):
            x, y = x.to(device), y.to(device=device, dtype=torch.int64)
            if x.shape[0] == 0:
                continue
            if i == 0 and cfg.check_model:
                from advmoe.attacks import check_evaluation_setup

                notes += _caught(check_evaluation_setup, model, x)
            ev.batch(x, y)
            bar.set_postfix(sa=f"{ev.tally.mean('sa'):.3f}", ra_worst=f"{ev.tally.mean('ra_worst'):.3f}")
        if ev.tally.count("sa") == 0:
            raise ValueError("evaluate: data holds no samples")
        result = ev.result(time.perf_counter() - start)
    finally:
        for m, was_training in previous:
            m.training = was_training
    if cfg.check_model:
        from advmoe.attacks import EvaluationWarning

        late = _result_warnings(result)
        for msg in late:
            warnings.warn(msg, EvaluationWarning, stacklevel=2)
        notes += late
    result["warnings"] = notes
    return result
