"""``advmoe convert``: a trained checkpoint (ours or the research code's) to the sparse deployed model."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from advmoe.checkpoint import ResearchSpec
from advmoe.cli.options import add_research_arguments, research_spec

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "convert_checkpoint", "example_input", "run"]


HELP = "convert a trained checkpoint into the sparse deployed model (BN folded, only active channels)"
DESCRIPTION = (
    "Convert an `advmoe train` checkpoint, or a research-code checkpoint (with --arch), into a "
    "deployed model; checks that its logits match the source model's."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``advmoe convert`` options."""
    p.add_argument("checkpoint", help="checkpoint of `advmoe train`, or of the research code (needs --arch)")
    p.add_argument("--out", required=True, help="deployed model file to write (load with advmoe.deploy.load_deployed)")
    p.add_argument(
        "--mode",
        default="auto",
        choices=("auto", "pathway", "grouped", "layer"),
        help="deployed form (default auto: measured, see advmoe.deploy.to_sparse)",
    )
    p.add_argument("--export", help="also write a torch.export program (.pt2) with a dynamic batch dimension")
    add_research_arguments(p)
    p.add_argument("--image-size", type=int, help="input size for the logits check (default 32; 64 for ImageNet)")


def example_input(model: torch.nn.Module, batch: int, image_size: int | None = None, seed: int | None = None):
    """(batch, C, S, S) uniform images for ``model``: S = ``image_size``, else 64 for ImageNet models, else 32."""
    size = image_size or (64 if "imagenet" in model.config.get("name", "") else 32)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.rand(batch, model.config.get("in_channels", 3), size, size, generator=generator)


def convert_checkpoint(
    checkpoint: str,
    mode: str = "auto",
    research: ResearchSpec | None = None,
    image_size: int | None = None,
):
    """Loads a checkpoint (ours, or the research code's with ``research``), converts it and checks the logits.

    Args:
        checkpoint: checkpoint file (read once, ``weights_only=True``; see ``advmoe.checkpoint.load_model``).
        mode: deployed form for ``advmoe.deploy.to_sparse`` (``"auto"`` measures).
        research: how to rebuild a research-code checkpoint; None for ours.
        image_size: input size of the logits check (default 32; 64 for ImageNet models).

    Returns:
        (source model, deployed model, report dict with ``mode``, ``reason``, ``max_abs_diff``, ``max_rel_diff``,
        ``near_ties`` (samples whose routing margin is below float noise, where the folded model may take the
        other expert), ``argmax_agree``).

    Raises:
        ValueError: unknown checkpoint format, or logits that do not match (near-ties excepted).
    """
    from advmoe.checkpoint import load_model
    from advmoe.deploy import to_sparse
    from advmoe.deploy.check import compare_deployed

    model, _ = load_model(checkpoint, research)
    x = example_input(model, 8, image_size, seed=0)
    deployed = to_sparse(model, mode=mode, example_input=x)
    with torch.no_grad():
        ref, out = model(x), deployed(x)
        check = compare_deployed(model, deployed, x)
    report = {
        "mode": deployed.deploy_mode,
        "reason": deployed.deploy_reason,
        "max_abs_diff": (ref - out).abs().max().item(),
        "max_rel_diff": check["max_rel_diff"],
        "near_ties": check["near_ties"],
        "argmax_agree": bool((ref.argmax(1) == out.argmax(1)).all()),
    }
    if not check["ok"]:
        raise ValueError(
            f"deployed logits differ from the source model on {check['mismatched'] - check['near_ties']} of "
            f"{check['n']} samples beyond 1e-4 relative (max {check['max_rel_diff']:.3g}), not routing near-ties"
        )
    return model, deployed, report


def run(args: argparse.Namespace) -> int:
    """Runs ``advmoe convert`` with the parsed arguments; returns the exit status."""
    from advmoe.deploy import save_deployed

    model, deployed, report = convert_checkpoint(args.checkpoint, args.mode, research_spec(args), args.image_size)
    path = save_deployed(deployed, args.out)
    print(
        f"deployed ({report['reason']}; logits max |diff| {report['max_abs_diff']:.2e}, "
        f"routing near-ties {report['near_ties']}) -> {path}"
    )
    if args.export:
        x = example_input(model, 2, args.image_size)
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.export.export(deployed, (x,), dynamic_shapes={"x": {0: batch}})
        Path(args.export).parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, args.export)
        print(f"torch.export program -> {args.export}")
    return 0
