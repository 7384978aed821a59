"""One (arm, seed) run of the study: train epoch by epoch, select on validation, evaluate on test.

Training uses ``advmoe.train.train`` one epoch at a time (``max_steps`` raised by one epoch, then an exact
resume), keeping ``epoch<k>.pt`` after each epoch; the trainer's per-epoch monitor runs on the validation
split (``data.test_split: val``), so its history gives the validation PGD RA of every epoch. The evaluated
checkpoint is the epoch with the best validation RA (ties: the later epoch). The research code's metric is
computed for every epoch on the test split and its maximum reported, as the research code does.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advmoe.eval import EVALUATION_VERSION
from advmoe.train.config import ExperimentConfig

__all__ = [
    "domain_agreement",
    "evaluate_run",
    "research_pgd",
    "run_fingerprint",
    "run_one",
    "select_epoch",
    "train_by_epoch",
]


def run_fingerprint(cfg: ExperimentConfig, ev: dict[str, Any]) -> dict[str, Any]:
    """What a finished run's result depends on: its training config, the study's eval section, and the
    version of ``advmoe.eval`` (results of an older evaluation are never reused)."""
    return {"config": cfg.to_dict(), "eval": ev, "evaluation_version": EVALUATION_VERSION}


def _steps_per_epoch(cfg: ExperimentConfig) -> int:
    from advmoe.data import build_dataset
    from advmoe.train.data import EpochBatchSampler

    d = cfg.data
    n = len(build_dataset(d.name, root=d.root, split="train", **d.kwargs))
    if d.max_train_samples is not None:
        n = min(n, d.max_train_samples)
    return EpochBatchSampler(n, cfg.train.batch_size, seed=cfg.seed).num_batches


def train_by_epoch(cfg: ExperimentConfig, run_dir: Path) -> list[dict[str, Any]]:
    """Train ``cfg`` into ``run_dir``, one epoch per call, keeping ``epoch<k>.pt`` (k = 1 .. epochs).

    Epochs whose checkpoint exists are not trained again (an interrupted run continues exactly).

    Returns:
        The trainer's epoch history (``epoch``, ``sa``, ``ra`` on validation, losses).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the run diverged).
    """
    from advmoe.train import train

    steps = _steps_per_epoch(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    for epoch in range(1, cfg.train.epochs + 1):
        ckpt = run_dir / f"epoch{epoch}.pt"
        if ckpt.is_file():
            continue
        step_cfg = copy.deepcopy(cfg)
        step_cfg.train.max_steps = steps * epoch
        resume = run_dir / f"epoch{epoch - 1}.pt" if epoch > 1 else False
        summary = train(step_cfg, run_dir, resume=resume)
        shutil.copyfile(run_dir / "last.pt", ckpt)
        history = summary["history"]
    if not history:  # all epochs existed: read the history from the last checkpoint
        from advmoe.checkpoint import load_checkpoint

        history = load_checkpoint(run_dir / f"epoch{cfg.train.epochs}.pt")["state"]["history"]
    return history


def select_epoch(history: list[dict[str, Any]]) -> int:
    """The epoch (1-based) with the highest validation RA; ties go to the later epoch."""
    scored = [(rec["ra"], round(rec["epoch"])) for rec in history if rec.get("ra") is not None]
    if not scored:
        raise ValueError("no evaluated epoch in the training history")
    best = max(ra for ra, _ in scored)
    return max(epoch for ra, epoch in scored if ra == best)


def research_pgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, router_weight: float, gen
) -> torch.Tensor:
    """The research code's test attack: PGD on CE(f(x), y) + w * sum over routers CE(scores, y mod E).

    Uniform random start in the eps-ball, ``steps`` signed-gradient steps of eps/4, L-inf projection, [0, 1].

    Args:
        model: classifier (eval mode); its parameters are not changed.
        x: (B, C, H, W) clean images in [0, 1].
        y: (B,) labels.
        eps: L-inf budget.
        steps: iterations (the research code: 10).
        router_weight: weight of the router term (the research code: its ``beta``, 6).
        gen: torch.Generator for the random start (on x's device).

    Returns:
        (B, C, H, W) adversarial images.
    """
    from advmoe.nn import forward_with_aux

    ce = nn.functional.cross_entropy
    alpha = eps / 4
    noise = torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1
    x_adv = (x + eps * noise).clamp(0, 1).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            logits, aux = forward_with_aux(model, x_adv)
            loss = ce(logits, y)
            for scores in aux.router_logits.values():
                loss = loss + router_weight * ce(scores, y % scores.shape[1])
            (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = (x_adv.detach() + alpha * grad.sign()).clamp(x - eps, x + eps).clamp(0, 1)
    return x_adv.detach()


def domain_agreement(routing: dict[str, torch.Tensor], domains: torch.Tensor) -> dict[str, float]:
    """Per MoE layer, the share of samples whose top-1 expert matches their domain (best expert permutation).

    Args:
        routing: {layer: (N, k) expert indices} (the first slot is used).
        domains: (N,) int64 domain labels in {0, 1}.

    Returns:
        {layer: agreement in [0.5, 1]} (1: the layer routes exactly by domain).
    """
    out = {}
    for name, idx in routing.items():
        same = (idx[:, 0].cpu() == domains.cpu()).float().mean().item()
        out[name] = max(same, 1.0 - same)
    return out


def _batches(x: torch.Tensor, y: torch.Tensor, size: int):
    for i in range(0, x.shape[0], size):
        yield x[i : i + size], y[i : i + size]


def _predict_with_routing(model: nn.Module, x: torch.Tensor, batch: int):
    """(predictions (N,), {layer: (N, k)} routing) without gradients."""
    from advmoe.nn import forward_with_aux

    preds, routes = [], {}
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            logits, aux = forward_with_aux(model, x[i : i + batch])
            preds.append(logits.argmax(1))
            for name, idx in aux.routing.items():
                routes.setdefault(name, []).append(idx)
    return torch.cat(preds), {k: torch.cat(v) for k, v in routes.items()}


def evaluate_run(model: nn.Module, test, ev: dict[str, Any], seed: int) -> dict[str, Any]:
    """The final evaluation of the selected checkpoint (see PROTOCOL.md); fractions in [0, 1].

    Args:
        model: the selected model (eval mode, on its device).
        test: the test dataset (``images``, ``targets``, optionally ``domains``).
        ev: the study's ``eval`` section.
        seed: seeds the attacks' random starts.

    Returns:
        ``{"sa", "n", "autoattack": {eps: RA}, "pgd": {eps: RA}, "routing": {...}, "domain_routing": {...}}``
        (only the configured metrics).
    """
    from advmoe.attacks import autoattack, pgd

    device = next(model.parameters()).device
    n = len(test) if ev.get("test_samples") is None else min(len(test), int(ev["test_samples"]))
    x = torch.stack([test[i][0] for i in range(n)]).to(device)
    y = test.targets[:n].to(device)
    metrics, bs = ev["metrics"], int(ev.get("batch_size", 500))
    gen = torch.Generator(device=device).manual_seed(seed)
    pred, clean_routing = _predict_with_routing(model, x, bs)
    clean_ok = pred == y
    out: dict[str, Any] = {"n": n, "sa": clean_ok.float().mean().item()}
    moe = bool(clean_routing)
    if "routing" in metrics and moe:
        out["routing"] = {
            "usage_clean": {k: torch.bincount(v[:, 0].cpu(), minlength=2).tolist() for k, v in clean_routing.items()},
            "kept": {},
        }
    if "domain_routing" in metrics and moe and hasattr(test, "domains"):
        out["domain_routing"] = domain_agreement(clean_routing, test.domains[:n])
    for eps in ev["eps"]:
        key = f"{eps:g}"
        attacks = []
        if "autoattack" in metrics:
            aa = ev.get("autoattack") or {}
            kw = {k: aa[k] for k in ("version", "n_iter", "n_targets", "square_queries") if aa.get(k) is not None}
            attacks.append(
                ("autoattack", lambda xb, yb, e=eps, kw=kw: autoattack(model, xb, yb, e, generator=gen, **kw))
            )
        if "pgd" in metrics:
            steps = int((ev.get("pgd") or {}).get("steps", 20))
            attacks.append(("pgd", lambda xb, yb, e=eps, k=steps: pgd(model, xb, yb, e, e / 4, k, generator=gen)))
        for name, attack in attacks:
            x_adv = torch.cat([attack(xb, yb) for xb, yb in _batches(x, y, bs)])
            adv_pred, adv_routing = _predict_with_routing(model, x_adv, bs)
            out.setdefault(name, {})[key] = (clean_ok & (adv_pred == y)).float().mean().item()
            if "routing" in out:
                kept = {k: (adv_routing[k] == v).all(1).float().mean().item() for k, v in clean_routing.items()}
                out["routing"]["kept"].setdefault(name, {})[key] = kept
    return out


def research_metric(run_dir: Path, epochs: int, test, ev: dict[str, Any], seed: int, device) -> dict[str, Any]:
    """The research code's metric per epoch on the test split, and its best-on-test value per eps."""
    from advmoe.checkpoint import load_model

    cfg = ev.get("research_pgd") or {}
    n = len(test) if cfg.get("samples") is None else min(len(test), int(cfg["samples"]))
    x = torch.stack([test[i][0] for i in range(n)]).to(device)
    y = test.targets[:n].to(device)
    bs = int(ev.get("batch_size", 500))
    per_epoch: dict[str, list[float]] = {f"{eps:g}": [] for eps in ev["eps"]}
    for epoch in range(1, epochs + 1):
        model, _ = load_model(run_dir / f"epoch{epoch}.pt", device=device)
        gen = torch.Generator(device=device).manual_seed(seed)
        for eps in ev["eps"]:
            ok = 0
            for xb, yb in _batches(x, y, bs):
                x_adv = research_pgd(
                    model, xb, yb, eps, int(cfg.get("steps", 10)), float(cfg.get("router_weight", 6)), gen
                )
                with torch.no_grad():
                    ok += int((model(x_adv).argmax(1) == yb).sum())
            per_epoch[f"{eps:g}"].append(ok / n)
    best = {k: max(v) for k, v in per_epoch.items()}
    best_epoch = {k: 1 + max(range(len(v)), key=lambda i: (v[i], i)) for k, v in per_epoch.items()}
    return {"n": n, "per_epoch": per_epoch, "best": best, "best_epoch": best_epoch}


def _flops(model: nn.Module, x: torch.Tensor) -> float | None:
    try:
        from advmoe.flops import count_flops
    except ImportError:
        return None
    with torch.no_grad():
        return float(count_flops(model, x)) / x.shape[0]


def run_one(study: dict[str, Any], arm: str, seed: int, work_dir: Path, fresh: bool = False) -> dict[str, Any]:
    """Train (or reuse) and evaluate one (arm, seed) run; returns its record (also saved as result.json)."""
    from study_config import arm_config

    from advmoe.checkpoint import load_model
    from advmoe.data import build_dataset
    from advmoe.train import NonFiniteLossError

    cfg = arm_config(study, arm, seed)
    ev = study["eval"]
    run_dir = Path(work_dir) / f"{arm}_seed{seed}"
    result_path = run_dir / "result.json"
    fingerprint = run_fingerprint(cfg, ev)
    if result_path.is_file() and not fresh:
        record = json.loads(result_path.read_text())
        if record.get("fingerprint") == fingerprint:
            print(f"[{arm} seed {seed}] reusing {result_path}", flush=True)
            return record
    stamp = run_dir / "fingerprint.json"  # epoch checkpoints are resumed only if they come from this config
    stale = run_dir.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != fingerprint["config"])
    if run_dir.exists() and (fresh or stale):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(fingerprint["config"]))
    label = study["arms"][arm].get("label", arm)
    base = {"arm": arm, "label": label, "seed": seed, "fingerprint": fingerprint}
    print(f"[{arm} seed {seed}] training -> {run_dir}", flush=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        history = train_by_epoch(cfg, run_dir)
    except NonFiniteLossError as err:  # a diverged run is a result too: record it, never drop it
        record = {**base, "diverged": True, "error": str(err), "train_time_s": round(time.perf_counter() - start, 1)}
        result_path.write_text(json.dumps(record, indent=1))
        print(f"[{arm} seed {seed}] diverged: {err}", flush=True)
        return record
    train_time, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    epoch = select_epoch(history)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_model(run_dir / f"epoch{epoch}.pt", device=device)
    d = cfg.data
    test = build_dataset(d.name, root=d.root, split="test", **d.kwargs)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = evaluate_run(model, test, ev, seed)
    if "flops" in ev["metrics"]:
        result["flops_per_image"] = _flops(model, torch.stack([test[i][0] for i in range(4)]).to(device))
    if "research_pgd" in ev["metrics"]:
        result["research_pgd"] = research_metric(run_dir, cfg.train.epochs, test, ev, seed, device)
    eval_time, eval_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    record = {
        **base,
        "diverged": False,
        "selected_epoch": epoch,
        "validation": [{k: rec.get(k) for k in ("epoch", "sa", "ra", "train_loss")} for rec in history],
        "train_time_s": round(train_time, 1),
        "eval_time_s": round(eval_time, 1),
        "train_cpu_s": round(train_cpu, 1),  # CPU time of this process: the wall time on an idle core
        "eval_cpu_s": round(eval_cpu, 1),
        "result": result,
    }
    result_path.write_text(json.dumps(record, indent=1))
    aa = result.get("autoattack") or result.get("pgd") or {}
    ra = "  ".join(f"RA@{k} {100 * v:.1f}" for k, v in aa.items())
    print(
        f"[{arm} seed {seed}] epoch {epoch}, train {train_time:.0f} s, eval {eval_time:.0f} s: "
        f"SA {100 * result['sa']:.1f}  {ra}",
        flush=True,
    )
    return record
