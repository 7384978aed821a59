"""``advmoe demo``: the project's main job, end to end on the embedded digits data, in a few minutes on a CPU.

1. Train a small MoE-CNN (``resnet10_mini``, r = 0.5, E = 2, one cheap model-level image router with
   standardised inputs, the default entropy balance term) with AdvMoE, and the dense PGD-AT baseline (same recipe as
   ``configs/digits_advmoe.yaml`` / ``configs/digits_at.yaml``).
2. Print SA and RA (PGD-10, eps 8/255) of both, the MoE model's expert usage per layer on the test set, and
   the AutoAttack RA of both models (``advmoe.eval.evaluate``; the variant is printed with the number).
3. Convert the MoE model with ``advmoe.deploy.to_sparse``, check that its logits match on the test set,
   save it (``deployed.pt``) and reload it.
4. Print a FLOPs / latency table against the dense model (plus the research code's masked MoE and the
   ideal slim network) and save plots and a JSON summary to the output folder.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

_EPS, _ALPHA, _EVAL_ALPHA = 8 / 255, 5 / 255, 2 / 255


# 12 epochs: each expert of the r = 0.5, E = 2 MoE learns from about half the images, so it needs about twice the
# epochs of a dense network; measured (PGD-10 RA, 360 test images) 89.2% at 6, 91.9% at 8, 93.3% at 10 and 95.6% at
# 12 epochs, against the dense model's 96.7% at 6 and 97.8% at 12 (docs/training.md, "Why 12 epochs")
DEFAULT_EPOCHS = 12


def _config_dict(
    strategy: str, epochs: int, seed: int, device: str, quick: bool, router: str = "image"
) -> dict[str, Any]:
    moe = strategy == "advmoe"
    # batch 32 at lr 0.05: measured after 6 epochs (PGD-AT, 360 test images), dense SA 98.9% / PGD-10 RA 96.1% and
    # slim r=0.5 98.6% / 94.7%, against 93.3% / 75.8% and 65.3% / 46.4% at batch 64, lr 0.02 (too few updates)
    opt = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}
    train = {
        "strategy": strategy,
        "epochs": epochs,
        "batch_size": 32,
        "attack": {"eps": _EPS, "alpha": _ALPHA, "steps": 2, "norm": "linf"},
        "optimizer": dict(opt),
        "router_optimizer": dict(opt),
        "eval_attack": {"eps": _EPS, "alpha": _EVAL_ALPHA, "steps": 10},
        "eval_samples": 360,
        "eval_every_epochs": 2,  # and always after the last epoch: half the evaluation time, 6 points per curve
        "log_every_steps": 5,
    }
    if moe:
        train.update(loss="ce", router_loss="task", router_steps=1, expert_steps=1)
    data = {"name": "digits", "kwargs": {"size": 32, "channels": 3}, "augment": True, "crop_padding": 2, "flip": False}
    if quick:
        train.update(epochs=1, max_steps=2, batch_size=16, eval_samples=32, progress=False)
        train["eval_attack"]["steps"] = 2
        data["max_train_samples"] = 64
    model = {
        "name": "resnet10_mini",
        "num_experts": 2 if moe else None,
        "ratio": 0.5 if moe else 1.0,
        "top_k": 1,
        "router": router,
    }
    if moe and router != "per_layer":
        # a model-level router learns its split faster through the raw-logit gate (measured: MoE SA 70.6% after
        # 6 epochs vs 40.6% with the softmax gate); per-layer routers need the bounded softmax gate
        # (docs/training.md, "The gate's gradient")
        model["gate_score"] = "logits"
    return {"seed": seed, "device": device, "model": model, "data": data, "train": train}


def _test_batches(n_max: int | None, batch: int = 120):
    from advmoe.data import build_dataset

    data = build_dataset("digits", split="test", size=32, channels=3)
    n = len(data) if n_max is None else min(n_max, len(data))
    xs = torch.stack([data[i][0] for i in range(n)])
    ys = torch.tensor([int(data[i][1]) for i in range(n)])
    return [(xs[i : i + batch], ys[i : i + batch]) for i in range(0, n, batch)]


@torch.no_grad()
def check_logits(model: torch.nn.Module, deployed: torch.nn.Module, batches, device) -> dict[str, float]:
    """Compares the deployed model's logits with the source model's on the given (x, y) batches."""
    diff, agree, correct, n = 0.0, 0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        ref, out = model(x), deployed(x)
        diff = max(diff, (ref - out).abs().max().item())
        agree += int((ref.argmax(1) == out.argmax(1)).sum())
        correct += int((out.argmax(1) == y).sum())
        n += x.shape[0]
    return {"max_abs_diff": diff, "prediction_agreement": agree / max(n, 1), "deployed_sa": correct / max(n, 1), "n": n}


def _usage_and_autoattack(
    models: dict, batches, device, autoattack: str, aa_samples: int, quick: bool
) -> dict[str, Any]:
    """Expert usage per MoE layer (clean test set) and AutoAttack RA of each model, via ``advmoe.eval``."""
    from advmoe.eval import EvalConfig, evaluate

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    short = {"autoattack_iters": 2, "autoattack_targets": 1} if quick else {}
    cfg = EvalConfig(
        eps=_EPS,
        attacks=["autoattack"],
        autoattack_version=autoattack,
        router_robustness=False,
        frozen_routing=False,
        pathway_worst_case=False,
        max_samples=min(aa_samples, x.shape[0]),
        batch_size=120,
        progress=False,
        seed=0,
        **short,
    )
    variant = f"AutoAttack {autoattack}" + (" (2 iterations, 1 target)" if quick else "")
    out: dict[str, Any] = {"variant": variant, "n": cfg.max_samples}
    for label, model in models.items():
        result = evaluate(model.to(device), (x.to(device), y.to(device)), cfg)
        out[label] = {"sa": result["sa"], "ra": result["ra"]["autoattack"]}
        usage = (result.get("expert_usage") or {}).get("clean")
        if usage:
            out[label]["usage"] = {k: [c / max(1, sum(v)) for c in v] for k, v in usage.items()}
    return out


def _print_usage(usage: dict[str, list[float]]) -> str:
    lines = ["  layer              " + "  ".join(f"expert {e}" for e in range(len(next(iter(usage.values())))))]
    for name, shares in usage.items():
        lines.append(f"  {name:18s} " + "  ".join(f"{100 * s:7.1f}%" for s in shares))
    top = max(max(s) for s in usage.values())
    verdict = "every layer uses all experts" if top < 0.9 else "SOME LAYER SENDS >= 90% TO ONE EXPERT"
    lines.append(f"  largest share of one expert in any layer: {100 * top:.1f}% ({verdict})")
    return "\n".join(lines)


def _print_costs(costs: dict[str, Any], device_text: str) -> str:
    flops, latency = costs["flops_g"], costs["latency_ms"]
    batches = sorted(next(iter(latency.values())))
    lines = [
        f"FLOPs (fvcore, per image, router included) and latency (median ms) on {device_text}:",
        "| model | MFLOPs/img | x dense | " + " | ".join(f"B={b} ms (x dense)" for b in batches) + " |",
        "|---|---|---|" + "---|" * len(batches),
    ]
    for k in latency:
        cells = [k, f"{1e3 * flops[k]:.1f}", f"{flops[k] / flops['dense']:.3f}"]
        cells += [f"{latency[k][b]:.2f} ({latency[k][b] / latency['dense'][b]:.3f})" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(costs: dict[str, Any], history: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = list(costs["flops_g"])
    axes[0].bar(names, [1e3 * costs["flops_g"][k] for k in names], color="tab:blue")
    axes[0].set_ylabel("MFLOPs / image (fvcore)")
    batches = sorted(next(iter(costs["latency_ms"].values())))
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        ratios = [costs["latency_ms"][k][b] / costs["latency_ms"]["dense"][b] for k in names]
        axes[1].bar([j + i * width for j in range(len(names))], ratios, width, label=f"B={b}")
    axes[1].set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(names))], names)
    axes[1].set_ylabel("latency / dense")
    axes[1].legend()
    for label, rows in history.items():
        epochs = [r["epoch"] for r in rows if "ra" in r]
        axes[2].plot(epochs, [100 * r["sa"] for r in rows if "ra" in r], marker="o", label=f"{label} SA")
        axes[2].plot(epochs, [100 * r["ra"] for r in rows if "ra" in r], marker="s", ls="--", label=f"{label} RA")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("accuracy (%)")
    axes[2].legend(fontsize=7)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(
    out: str | Path = "runs/demo",
    epochs: int = DEFAULT_EPOCHS,
    device: str = "cpu",
    seed: int = 1234,
    router: str = "image",
    latency_batches: list[int] | tuple[int, ...] | None = None,
    autoattack: str = "fast",
    aa_samples: int = 360,
    quick: bool = False,
) -> dict[str, Any]:
    """Runs the demo (see the module docstring) and returns its summary (also written to ``summary.json``).

    Args:
        out: output folder (the two training runs, ``deployed.pt``, ``demo.png``, ``summary.json``, ``costs.md``).
        epochs: training epochs of each model (the same for both; default ``DEFAULT_EPOCHS``).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        seed: random seed of both runs.
        router: MoE routing: ``"image"`` (one two-conv router on the image drives every layer), ``"per_layer"``
            or ``"research"`` (the research code's ResNet-20 router).
        latency_batches: latency batch sizes (default ``[1, 64]``; quick: ``[1, 4]``).
        autoattack: AutoAttack version of the final RA, ``"fast"`` or ``"standard"``.
        aa_samples: test samples for AutoAttack.
        quick: CI mode: a few training steps, tiny evaluation.

    Raises:
        ValueError: an argument out of range (checked before any work; the message names it).
    """
    if router not in ("image", "per_layer", "research"):
        raise ValueError(f"router must be 'image', 'per_layer' or 'research', got {router!r}")
    if autoattack not in ("fast", "standard"):
        raise ValueError(f"autoattack must be 'fast' or 'standard', got {autoattack!r}")
    sizes = [("latency_batches", b) for b in latency_batches or ()]
    for name, value in [("epochs", epochs), ("aa_samples", aa_samples), *sizes]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    from advmoe.bench.costs import cost_table
    from advmoe.bench.timing import device_description
    from advmoe.checkpoint import load_model
    from advmoe.deploy import load_deployed, save_deployed, to_sparse
    from advmoe.train import ExperimentConfig, train
    from advmoe.train.distributed import resolve_device

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    runs, history = {}, {}
    for label, strategy in (("advmoe", "advmoe"), ("dense_at", "pgd_at")):
        print(f"== training {label}: resnet10_mini {'MoE r=0.5 E=2' if strategy == 'advmoe' else 'dense'}, {strategy}")
        settings = _config_dict(strategy, epochs, seed, str(device), quick, router)
        cfg = ExperimentConfig.from_dict(settings)
        summary = train(cfg, out / label)
        runs[label], _ = load_model(out / label / "last.pt", device=device)
        history[label] = summary["history"]
    rows = {k: v[-1] for k, v in history.items()}
    attack = "PGD-2" if quick else "PGD-10"
    print(f"\n== robustness (digits test, {rows['advmoe'].get('eval_samples')} samples, {attack}, eps 8/255)")
    for label, r in rows.items():
        print(f"  {label:9s} SA {100 * r['sa']:6.2f}%   RA {100 * r['ra']:6.2f}%")

    moe, dense = runs["advmoe"], runs["dense_at"]
    batches = _test_batches(32 if quick else None)
    final = _usage_and_autoattack({"advmoe": moe, "dense_at": dense}, batches, device, autoattack, aa_samples, quick)
    print(f"\n== expert usage of the MoE model per layer (digits test, {sum(b[0].shape[0] for b in batches)} samples)")
    print(_print_usage(final["advmoe"]["usage"]))
    print(f"\n== {final['variant']}, eps 8/255, {final['n']} test samples")
    for label in ("advmoe", "dense_at"):
        print(f"  {label:9s} SA {100 * final[label]['sa']:6.2f}%   RA {100 * final[label]['ra']:6.2f}%")
    deployed = to_sparse(moe, example_input=batches[0][0][:2].to(device))
    check = check_logits(moe, deployed, batches, device)
    path = save_deployed(deployed, out / "deployed.pt")
    reloaded = load_deployed(path, map_location=device)
    check_reload = check_logits(deployed, reloaded, batches[:1], device)
    print(f"\n== deployed ({deployed.deploy_mode} mode) -> {path}")
    print(
        f"  logits vs training model: max |diff| {check['max_abs_diff']:.2e}, predictions agree "
        f"{100 * check['prediction_agreement']:.1f}% of {check['n']}, SA {100 * check['deployed_sa']:.2f}%; "
        f"reloaded max |diff| {check_reload['max_abs_diff']:.1e}"
    )
    tol = 1e-3
    if not check["max_abs_diff"] <= tol or not check_reload["max_abs_diff"] <= tol:
        raise RuntimeError(f"deployed logits do not match the training model (tolerance {tol})")

    lat_batches = latency_batches or ([1, 4] if quick else [1, 64])
    inputs = _test_batches(None, batch=max(lat_batches))[0][0]
    costs = cost_table(dense, moe, deployed, device, inputs, tuple(lat_batches), repeats=2 if quick else 10)
    table = _print_costs(costs, device_description(device)) + f"\nEvery side: {costs['treatment']}"
    print("\n" + table)
    _plot(costs, history, out / "demo.png")
    summary = {
        "device": device_description(device),
        "quick": bool(quick),
        "epochs": epochs,
        "sa_ra": {
            k: {"sa": r["sa"], "ra": r["ra"], "attack": attack, "n": r.get("eval_samples")} for k, r in rows.items()
        },
        "deploy": {"mode": deployed.deploy_mode, **check},
        "autoattack": {k: v for k, v in final.items() if k not in ("advmoe", "dense_at")}
        | {k: {"sa": final[k]["sa"], "ra": final[k]["ra"]} for k in ("advmoe", "dense_at")},
        "expert_usage": final["advmoe"]["usage"],
        "costs": copy.deepcopy(costs),
        "seconds": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "costs.md").write_text(table + "\n")
    print(
        f"\nplots: {out / 'demo.png'}, training curves: {out}/<run>/; summary: {out / 'summary.json'} "
        f"({summary['seconds']:.0f} s)"
    )
    return summary
