"""``advmoe convert|bench|demo``: the deployment subcommands of the ``advmoe`` command line.

Examples::

    advmoe demo                                      # the main job: train, convert, measure (a few minutes)
    advmoe convert runs/digits_advmoe/best_ra.pt --out deployed.pt --export deployed.pt2
    advmoe convert research_r18.pth --arch resnet18_cifar --num-experts 2 --ratio 0.5 --out r18_deployed.pt
    advmoe bench --models resnet18_cifar --batch 1 16 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_subcommands", "convert_checkpoint"]


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Adds ``convert``, ``bench`` and ``demo`` to the ``advmoe`` parser's subparsers."""
    p = sub.add_parser(
        "convert", help="convert a trained checkpoint into the sparse deployed model (BN folded, only active channels)",
        description="Convert an `advmoe train` checkpoint, or a research-code checkpoint (with --arch), into a "
        "deployed model; checks that its logits match the source model's.",
    )  # fmt: skip
    p.add_argument("checkpoint", help="checkpoint of `advmoe train`, or of the research code (needs --arch)")
    p.add_argument("--out", required=True, help="deployed model file to write (load with advmoe.deploy.load_deployed)")
    p.add_argument("--mode", default="auto", choices=("auto", "pathway", "grouped", "layer"),
                   help="deployed form (default auto: measured, see advmoe.deploy.to_sparse)")  # fmt: skip
    p.add_argument("--export", help="also write a torch.export program (.pt2) with a dynamic batch dimension")
    p.add_argument("--arch", help="research-code checkpoint: architecture, e.g. resnet18_cifar")
    p.add_argument("--num-experts", type=int, default=2, help="research-code checkpoint: E (default 2)")
    p.add_argument("--ratio", type=float, default=0.5, help="research-code checkpoint: width ratio (default 0.5)")
    p.add_argument("--num-classes", type=int, default=10, help="research-code checkpoint: classes (default 10)")
    p.add_argument("--image-size", type=int, help="input size for the logits check (default 32; 64 for ImageNet)")
    p.set_defaults(func=_run_convert)

    p = sub.add_parser(
        "bench", help="FLOPs and latency: dense vs masked (research) vs sparse vs deployed vs ideal slim",
        description="Model benchmark; writes models_bench.{json,md,png} to benchmarks/results/<device>/ "
        "(or --out).",
    )  # fmt: skip
    p.add_argument("--models", nargs="+", help="zoo names (default: the six README models)")
    p.add_argument("--batch", nargs="+", type=int, help="batch sizes (default 1 16 64, +256 on GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (default fp32)")
    p.add_argument("--ratio", type=float, default=0.5, help="MoE width ratio r (default 0.5)")
    p.add_argument("--num-experts", type=int, default=2, help="E (default 2)")
    p.add_argument("--repeats", type=int, help="timed rounds (default: fit --budget, 3..20)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up rounds (default 2)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per (model, batch) when --repeats is unset")
    p.add_argument("--backends", nargs="+", help="op backends for the sparse[...] rows (default: all present)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny CI mode (resnet10_mini, B=1,4, 2 repeats)")
    p.add_argument(
        "--clock", default="wall", choices=("wall", "thread"),
        help="wall: latency (default); thread: CPU time of one thread (1 thread), for machines shared with other jobs",
    )  # fmt: skip
    p.add_argument("--router", default="research", choices=("research", "per_layer"),
                   help="MoE routers: one model-level research router (default) or per-layer routers")  # fmt: skip
    p.add_argument("--variants", nargs="+", help="variants to run (default all; e.g. dense deployed ideal router)")
    p.add_argument(
        "--execution",
        default="eager",
        choices=("eager", "graph", "compile"),
        help="every variant eager (default), CUDA-graph captured (GPU), torch.compile reduce-overhead",
    )
    p.add_argument("--out", help="output folder (default benchmarks/results/<device-slug>)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.set_defaults(func=_run_bench)

    from advmoe.demo import add_demo_arguments

    p = sub.add_parser(
        "demo", help="train a small MoE-CNN with AdvMoE on digits (+ dense AT), convert, measure (a few minutes)",
        description="The main job on the embedded digits data: AdvMoE and dense PGD-AT training, SA/RA, "
        "conversion to the sparse deployed model, logits check, FLOPs/latency table, plots.",
    )  # fmt: skip
    add_demo_arguments(p)
    p.set_defaults(func=_run_demo)


def convert_checkpoint(
    checkpoint: str, mode: str = "auto", arch: str | None = None, num_experts: int = 2, ratio: float = 0.5,
    num_classes: int = 10, image_size: int | None = None,
):  # fmt: skip
    """Loads a checkpoint (ours or the research code's), converts it and checks the logits.

    Returns:
        (source model, deployed model, report dict with ``mode``, ``reason``, ``max_abs_diff``, ``max_rel_diff``,
        ``near_ties`` (samples whose routing margin is below float noise, where the folded model may take the
        other expert), ``argmax_agree``).

    Raises:
        ValueError: unknown checkpoint format, or logits that do not match (near-ties excepted).
    """
    import torch

    from advmoe.checkpoint import load_checkpoint
    from advmoe.deploy import load_research_checkpoint, to_sparse
    from advmoe.deploy.check import compare_deployed

    ckpt = load_checkpoint(checkpoint)
    if arch is not None:
        model = load_research_checkpoint(ckpt, arch, num_experts, ratio, num_classes)
    elif ckpt.get("format", "").startswith("advmoe.train"):
        from advmoe.train.trainer import load_trained_model

        model, _ = load_trained_model(checkpoint)
    elif "state_dict" in ckpt and "router" in ckpt:
        raise ValueError(
            "this looks like a research-code checkpoint: pass --arch (and --num-experts/--ratio/--num-classes)"
        )
    else:
        raise ValueError(f"{checkpoint!r} is neither an `advmoe train` checkpoint nor a research-code one")
    model.eval()
    size = image_size or (64 if "imagenet" in model.config.get("name", "") else 32)
    x = torch.rand(8, model.config.get("in_channels", 3), size, size, generator=torch.Generator().manual_seed(0))
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


def _run_convert(args: argparse.Namespace) -> int:
    import torch

    from advmoe.deploy import save_deployed

    model, deployed, report = convert_checkpoint(
        args.checkpoint, args.mode, args.arch, args.num_experts, args.ratio, args.num_classes, args.image_size
    )
    path = save_deployed(deployed, args.out)
    print(f"deployed ({report['reason']}; logits max |diff| {report['max_abs_diff']:.2e}, "
          f"routing near-ties {report['near_ties']}) -> {path}")  # fmt: skip
    if args.export:
        size = args.image_size or (64 if "imagenet" in model.config.get("name", "") else 32)
        x = torch.rand(2, model.config.get("in_channels", 3), size, size)
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.export.export(deployed, (x,), dynamic_shapes={"x": {0: batch}})
        Path(args.export).parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, args.export)
        print(f"torch.export program -> {args.export}")
    return 0


def _command_line(name: str, args: argparse.Namespace) -> str:
    """The ``advmoe`` command equivalent to the parsed arguments (recorded with the results)."""
    parts = ["advmoe", name]
    for key, value in vars(args).items():
        if key in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from advmoe.bench.models import run_benchmark
    from advmoe.bench.report import markdown_table, write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_benchmark(
        models=args.models, batches=args.batch, device=args.device, dtype=args.dtype, ratio=args.ratio,
        num_experts=args.num_experts, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget,
        backends=args.backends, quick=args.quick, clock=args.clock, router=args.router, variants=args.variants,
        execution=args.execution, command=_command_line("bench", args),
    )  # fmt: skip
    out = args.out or str(Path("benchmarks") / "results" / results["device_slug"])
    paths = write_results(results, out, plot=not args.no_plot)
    print(markdown_table(results))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from advmoe.demo import run_demo

    run_demo(args)
    return 0
