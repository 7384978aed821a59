"""``evaluate(model, data, cfg) -> dict``: standard and robust accuracy, routing robustness, expert usage.

Conventions (docs/evaluation.md): accuracies and shares are fractions in [0, 1] over the evaluated samples.
A sample is robust under an attack when it is classified correctly both clean and attacked (AutoAttack's
convention), so every robust accuracy is at most SA. Every adversarial example is scored on the real model
(routers live, hard gates), also those found on a stand-in of it (routing frozen to the clean choice, a
fixed pathway, the soft-routing surrogate). ``ra_worst`` is the per-sample AND over all of them, i.e. the
accuracy against the best attack per sample. ``ra_frozen_routing`` alone is scored on the frozen model
(robustness of the experts without the routers) and is not part of ``ra_worst``. The model is evaluated
in eval mode; its previous mode is restored afterwards.
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
from advmoe.eval.metrics import (
    GRADIENT_ATTACKS,
    Tally,
    attack_label,
    autoattack_variant_of,
    correct,
    perturbed,
    run_attack,
)
from advmoe.eval.routing_metrics import ALL_LAYERS, UsageCounter, layer_num_experts, routing_of, tally_unchanged

__all__ = ["evaluate"]

REAL_MODEL = "real model (routers live)"


def _caught(fn, *args) -> list[str]:
    """Run ``fn(*args)``, re-issue its warnings, and return their messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return [str(w.message) for w in caught]


def _pathway_plan(model: nn.Module, cfg: EvalConfig) -> dict[str, Any] | None:
    """Which fixed-pathway attacks run: ``{"kind": "all" | "uniform", "count": P}``, or None for none.

    "all": a model-level top-1 router, whose P = E pathways are all the model can take. "uniform": any other
    MoE model (per-layer routers, top-k > 1): the P = E pathways that put every layer on expert p (experts
    p..p+k-1 mod E for top-k), a subset of its pathways; E is the smallest expert count of its layers.
    """
    from advmoe.nn import moe_layers, num_pathways

    exact = num_pathways(model)
    if exact is not None:
        kind, count = "all", exact
    else:
        kind, count = "uniform", min(layer.num_experts for _, layer in moe_layers(model))
    if not (cfg.pathway_worst_case and 2 <= count <= cfg.max_pathways):
        return None
    return {"kind": kind, "count": count}


def _row(result: str, attack: str, attacked: str, scored_on: str, in_ra_worst: bool) -> dict[str, Any]:
    return {
        "result": result,
        "attack": attack,
        "attacked": attacked,
        "scored_on": scored_on,
        "in_ra_worst": in_ra_worst,
    }


class _Evaluator:
    """State of one evaluation: the tallies and usage counters filled batch by batch.

    Per batch: every attack of ``cfg.attacks`` and the router attack run on the real model; then the PGD
    attacks of ``cfg.attacks`` (``GRADIENT_ATTACKS``) run on three stand-ins of it, and their examples are
    always re-scored on the real, routed model and counted in ``ra_worst``: the model with routing frozen
    to each sample's clean choice, the model forced through each fixed pathway, and the soft-routing
    surrogate (``advmoe.attacks.soft_routing``).
    """

    def __init__(self, model: nn.Module, cfg: EvalConfig, device: torch.device) -> None:
        from advmoe.nn import is_moe, num_pathways

        self.model, self.cfg, self.device = model, cfg, device
        self.moe = is_moe(model)
        self.pathways = num_pathways(model) if self.moe else 1
        self.grad_attacks = [a for a in cfg.attacks if a in GRADIENT_ATTACKS]
        self.run_router_attack = self.moe and cfg.router_robustness and cfg.router_attack_steps > 0
        self.run_frozen = self.moe and cfg.frozen_routing and bool(self.grad_attacks)
        self.pathway_plan = _pathway_plan(model, cfg) if self.moe and self.grad_attacks else None
        self.run_soft = self.moe and cfg.soft_routing and bool(self.grad_attacks)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.tally = Tally()
        self.num_classes: int | None = None
        experts = layer_num_experts(model) if self.moe else {}
        names = ["clean", *cfg.attacks] + (["router_attack"] if self.run_router_attack else [])
        self.usage = {name: UsageCounter(experts) for name in names}
        self.num_attacked = dict.fromkeys(names[1:], 0)
        self.num_experts = experts

    def _attacked(self, name: str, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, clean_ok, clean_routing):
        """Tally expert usage and routing changes of ``x_adv`` (B, C, H, W); return (B,) "still correct" flags.

        "Routing kept" is tallied only over the attacked samples: classified correctly when clean AND changed
        by the attack (``x_adv != x``). AutoAttack returns the clean input for every sample it did not fool,
        so under AutoAttack these are exactly the samples it fooled.
        """
        if not self.moe:
            return correct(self.model, x_adv, y)
        logits, routing = routing_of(self.model, x_adv)
        if self.cfg.router_robustness:
            attacked = clean_ok & perturbed(x_adv, x)
            self.num_attacked[name] += int(attacked.sum())
            before = {k: v[attacked] for k, v in clean_routing.items()}
            tally_unchanged(self.tally, f"router/{name}", before, {k: v[attacked] for k, v in routing.items()})
        self.usage[name].add(routing)
        return logits.argmax(dim=1) == y

    def _rescored(self, examples: list[torch.Tensor], y: torch.Tensor, clean_ok: torch.Tensor) -> torch.Tensor:
        """(B,) bool: correct on the real, routed model on every example set (and clean)."""
        ok = clean_ok.clone()
        for x_adv in examples:
            ok &= correct(self.model, x_adv, y)
        return ok

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from advmoe.attacks import calibrated_temperatures, router_attack, soft_routing
        from advmoe.nn import frozen_routing

        cfg, model = self.cfg, self.model
        if self.moe:
            logits, routing = routing_of(model, x)
            self.usage["clean"].add(routing)
        else:
            with torch.no_grad():
                logits, routing = model(x), {}
        self.num_classes = logits.shape[1]
        clean_ok = logits.argmax(dim=1) == y
        self.tally.add("sa", clean_ok)
        worst = clean_ok.clone()
        for name in cfg.attacks:
            x_adv = run_attack(name, model, x, y, cfg, self.generator)
            ok = clean_ok & self._attacked(name, x, x_adv, y, clean_ok, routing)
            self.tally.add(f"ra/{name}", ok)
            worst &= ok
        if self.run_router_attack:
            x_adv = router_attack(
                model,
                x,
                eps=cfg.eps,
                alpha=cfg.pgd_alpha,
                steps=cfg.router_attack_steps,
                norm=cfg.norm,
                generator=self.generator,
            ).detach()
            ok = clean_ok & self._attacked("router_attack", x, x_adv, y, clean_ok, routing)
            self.tally.add("ra/router_attack", ok)
            worst &= ok
        if self.run_frozen:  # attack the experts along the clean routing; score on the frozen AND the real model
            frozen_ok, examples = clean_ok.clone(), []
            with frozen_routing(model, routing):
                for name in self.grad_attacks:
                    examples.append(run_attack(name, model, x, y, cfg, self.generator))
                    frozen_ok &= correct(model, examples[-1], y)
            self.tally.add("ra_frozen_routing", frozen_ok)
            ok = self._rescored(examples, y, clean_ok)
            self.tally.add("ra_frozen_routing_rescored", ok)
            worst &= ok
        if self.pathway_plan is not None:  # attack each fixed pathway, score on the real model
            all_ok = clean_ok.clone()
            for p in range(self.pathway_plan["count"]):
                with frozen_routing(model, p):
                    examples = [run_attack(name, model, x, y, cfg, self.generator) for name in self.grad_attacks]
                ok = self._rescored(examples, y, clean_ok)
                self.tally.add(f"ra_pathway/{p}", ok)
                all_ok &= ok
            self.tally.add("ra_pathway_worst", all_ok)
            worst &= all_ok
        if self.run_soft:  # attack the soft-routing surrogate end to end, score on the real (hard) model
            temperatures = calibrated_temperatures(model, x, cfg.soft_routing_temperature)
            with soft_routing(model, temperatures):
                self.tally.add("sa_soft_routing", correct(model, x, y))
                examples = [run_attack(name, model, x, y, cfg, self.generator) for name in self.grad_attacks]
            ok = self._rescored(examples, y, clean_ok)
            self.tally.add("ra_soft_routing", ok)
            worst &= ok
        self.tally.add("ra_worst", worst)

    def _router_robustness(self) -> dict[str, Any] | None:
        if not (self.moe and self.cfg.router_robustness):
            return None
        out = {}
        for name, num in self.num_attacked.items():
            prefix = f"router/{name}/"
            per_layer = {k[len(prefix) :]: self.tally.mean(k) for k in self.tally.names() if k.startswith(prefix)}
            overall = per_layer.pop(ALL_LAYERS, None)
            out[name] = {"all_layers": overall, "per_layer": per_layer, "num_attacked": num}
        return out

    def _plan(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        """One row per reported robust accuracy: which attack made the examples, on which model, scored where."""
        rows = [_row(f"ra.{name}", label, REAL_MODEL, REAL_MODEL, True) for name, label in labels.items()]
        grad = " and ".join(labels[a] for a in self.grad_attacks)
        if self.run_frozen:
            frozen = "routing frozen to each sample's clean choice"
            rows.append(_row("ra_frozen_routing", grad, frozen, frozen, False))
            rows.append(_row("ra_frozen_routing_rescored", grad, frozen, REAL_MODEL, True))
        if self.pathway_plan is not None:
            kind = "all pathways" if self.pathway_plan["kind"] == "all" else "uniform pathways: every layer on it"
            for p in range(self.pathway_plan["count"]):
                rows.append(_row(f"ra_pathway.{p}", grad, f"every sample on pathway {p} ({kind})", REAL_MODEL, True))
        if self.run_soft:
            soft = (
                "soft-routing surrogate (softmax mix of experts, per-layer T = "
                f"{self.cfg.soft_routing_temperature:g} x the layer's median clean gap between its top two scores)"
            )
            rows.append(_row("ra_soft_routing", grad, soft, REAL_MODEL, True))
        return rows

    def result(self, elapsed: float) -> dict[str, Any]:
        t, cfg = self.tally, self.cfg
        ra_names = [*cfg.attacks] + (["router_attack"] if self.run_router_attack else [])
        labels = {name: attack_label(name, cfg, self.num_classes) for name in ra_names}
        plan = self.pathway_plan
        return {
            "num_samples": t.count("sa"),
            "model": {"moe": self.moe, "num_pathways": self.pathways, "num_experts": self.num_experts},
            "config": to_dict(cfg),
            "attack_labels": labels,
            "autoattack_variant": autoattack_variant_of(cfg) if "autoattack" in cfg.attacks else None,
            "evaluation_plan": self._plan(labels),
            "sa": t.mean("sa"),
            "ra": {name: t.mean(f"ra/{name}") for name in ra_names},
            "ra_worst": t.mean("ra_worst"),
            "ra_frozen_routing": t.mean("ra_frozen_routing") if self.run_frozen else None,
            "ra_frozen_routing_rescored": t.mean("ra_frozen_routing_rescored") if self.run_frozen else None,
            "pathways": dict(plan) if plan else None,
            "ra_pathway": {str(p): t.mean(f"ra_pathway/{p}") for p in range(plan["count"])} if plan else None,
            "ra_pathway_worst": t.mean("ra_pathway_worst") if plan else None,
            "ra_soft_routing": t.mean("ra_soft_routing") if self.run_soft else None,
            "sa_soft_routing": t.mean("sa_soft_routing") if self.run_soft else None,
            "router_robustness": self._router_robustness(),
            "expert_usage": {name: c.as_dict() for name, c in self.usage.items()} if self.moe else None,
            "warnings": [],
            "time_s": round(elapsed, 3),
            "device": str(self.device),
        }


def _result_warnings(result: dict[str, Any]) -> list[str]:
    """Honest-evaluation checks on the finished numbers (gradient masking signs)."""
    msgs = []
    grad = [result["ra"][a] for a in GRADIENT_ATTACKS if a in result["ra"]]
    stand_ins = {
        "attacks with fixed pathways": result["ra_pathway_worst"],
        "attacks with routing frozen (re-scored on the real model)": result["ra_frozen_routing_rescored"],
        "attacks on the soft-routing surrogate (re-scored on the real model)": result["ra_soft_routing"],
    }
    for what, value in stand_ins.items():
        if value is not None and grad and value < min(grad) - 0.01:
            msgs.append(
                f"{what} reach RA {value:.3f}, below the plain gradient attacks' {min(grad):.3f}: the hard "
                "routing gate masks gradients; report ra_worst, not ra/pgd_*"
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
        A JSON-able dict: ``sa``, ``ra`` {attack: RA}, ``ra_worst``, ``ra_frozen_routing`` (scored on the
        frozen model), ``ra_frozen_routing_rescored``, ``pathways`` {"kind", "count"}, ``ra_pathway``
        {pathway: RA}, ``ra_pathway_worst``, ``ra_soft_routing``, ``sa_soft_routing`` (the surrogate's clean
        accuracy), ``router_robustness`` {attack: {"all_layers", "per_layer", "num_attacked"}},
        ``expert_usage`` {"clean" | attack: {layer: counts per expert}}, ``attack_labels`` {attack: label},
        ``autoattack_variant`` (e.g. ``"autoattack-standard"``), ``evaluation_plan`` (one row per robust
        accuracy: attack, attacked model, model scored on, counted in ``ra_worst``), ``warnings``,
        ``num_samples``, ``time_s`` and the config; MoE-only entries are None for dense models.

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
