"""``advmoe demo``: the main job end to end on the embedded digits data (``advmoe.demo.run_demo``)."""

from __future__ import annotations

import argparse

from advmoe.demo import DEFAULT_EPOCHS

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]


HELP = "train a small MoE-CNN with AdvMoE on digits (+ dense AT), convert, measure (a few minutes)"
DESCRIPTION = (
    "The main job on the embedded digits data: AdvMoE and dense PGD-AT training, SA/RA, "
    "conversion to the sparse deployed model, logits check, FLOPs/latency table, plots."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``advmoe demo`` options."""
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"training epochs of each model (default {DEFAULT_EPOCHS})"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--seed", type=int, default=1234, help="random seed (default 1234)")
    p.add_argument(
        "--router",
        default="image",
        choices=("image", "per_layer", "research"),
        help="MoE routing (default image: one cheap two-conv router on the image drives every layer, so each "
        "sample keeps one pathway; per_layer: a GAP+linear router per layer, which learns far more slowly when "
        "balanced; research: the research code's ResNet-20 router, which alone costs more than the model)",
    )
    p.add_argument("--batches", nargs="+", type=int, help="latency batch sizes (default 1 64; quick: 1 4)")
    p.add_argument(
        "--autoattack",
        default="fast",
        choices=("fast", "standard"),
        help="AutoAttack version for the final RA of both models (default fast; quick: 2 iterations)",
    )
    p.add_argument("--aa-samples", type=int, default=360, help="test samples for AutoAttack (default 360)")
    p.add_argument("--quick", action="store_true", help="CI mode: a few training steps, tiny evaluation (< 60 s)")


def run(args: argparse.Namespace) -> int:
    """Runs ``advmoe demo`` with the parsed arguments; returns the exit status."""
    from advmoe.demo import run_demo

    run_demo(
        out=args.out,
        epochs=args.epochs,
        device=args.device,
        seed=args.seed,
        router=args.router,
        latency_batches=args.batches,
        autoattack=args.autoattack,
        aa_samples=args.aa_samples,
        quick=args.quick,
    )
    return 0
