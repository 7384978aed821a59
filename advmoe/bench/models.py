"""Model benchmark: FLOPs and latency of dense, masked (research code), sparse, deployed and ideal models.

For each model name, with MoE width ratio r and E experts (top-1, the research code's model-level router):

- ``dense``: the dense CNN (r = 1).
- ``masked``: the research code's MoE formulation (all experts computed, then masked), same weights.
- ``sparse[<backend>]``: our MoE model, each ``sparse_moe_conv2d`` backend available on the device.
- ``deployed``: ``advmoe.deploy.to_sparse(moe)`` (auto mode); ``deployed[layer]``: its per-layer form.
- ``ideal``: the slim dense CNN of the active width (``create_model(name, ratio=r)``) plus the router.

Latency: medians of interleaved runs after warm-up, one process (``advmoe.bench.timing``); ratios against
dense and against ideal. FLOPs: ``advmoe.flops.count_flops`` (fvcore, one multiply-add = one FLOP), per image.
The routers of the untrained benchmark models are calibrated to split the batch evenly between experts,
as a trained (balanced) router would; the share actually measured is stored with the results.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from advmoe.bench.masked import to_masked
from advmoe.bench.timing import device_description, device_slug, time_interleaved
from advmoe.nn.routers import calibrate_router_norms

CIFAR_MODELS = ("resnet18_cifar", "wrn_28_10_cifar", "vgg16_bn", "densenet_cifar")
IMAGENET_MODELS = ("resnet18_imagenet", "resnet50_imagenet")
DEFAULT_MODELS = CIFAR_MODELS + IMAGENET_MODELS
QUICK_MODELS = ("resnet10_mini",)
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def image_size(name: str) -> int:
    """Input size the benchmark uses for a model: 224 for ImageNet models, else 32."""
    return 224 if "imagenet" in name else 32


def default_batches(device: torch.device) -> tuple[int, ...]:
    """1, 16, 64 on CPU; plus 256 on GPU."""
    return (1, 16, 64) if device.type == "cpu" else (1, 16, 64, 256)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Parses "fp32" / "bf16" / "fp16" (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@torch.no_grad()
def balance_router(model: nn.Module, x: torch.Tensor) -> None:
    """Shifts the model-level router's output bias so that the batch x splits evenly between experts.

    Stands in for a trained router (the research recipe supervises routing to be balanced). The threshold
    lies midway between two samples' score gaps, so no sample sits on a tie. No-op without a model-level
    router or with a single sample.
    """
    router = getattr(model, "router", None)
    if router is None or x.shape[0] < 2 or not hasattr(router, "fc"):
        return
    xn = model.normalize(x) if getattr(model, "normalize", None) is not None else x
    calibrate_router_norms(router, xn)
    scores = router(xn).double()
    half = x.shape[0] // 2
    for e in range(1, scores.shape[1]):
        gap = (scores[:, e] - scores[:, 0]).sort().values
        shift = (gap[half - 1] + gap[half]) / 2
        router.fc.bias[e] -= shift.to(router.fc.bias.dtype)
        scores[:, e] -= shift


def _routing_share(model: nn.Module, x: torch.Tensor) -> list[float] | None:
    router = getattr(model, "router", None)
    if router is None:
        return None
    xn = model.normalize(x) if getattr(model, "normalize", None) is not None else x
    with torch.no_grad():
        choice = router(xn).argmax(1)
    counts = torch.bincount(choice, minlength=router.num_experts).double()
    return (counts / counts.sum()).tolist()


@torch.no_grad()
def balance_per_layer_routers(model: nn.Module, x: torch.Tensor) -> None:
    """Shifts every per-layer router's bias so that, layer by layer, the batch x splits evenly between experts.

    One forward pass; a pre-hook calibrates each router on the input it actually receives (after the
    earlier layers' calibrated routing), as ``balance_router`` does for a model-level router.
    """
    from advmoe.nn import PerLayerRouter

    calibrate_router_norms(model, x)
    handles = []

    def calibrate(router, inputs):
        scores = router.forward(inputs[0]).double()  # forward(), not __call__: this hook would recurse
        half = scores.shape[0] // 2
        if half < 1:
            return
        for e in range(1, scores.shape[1]):
            gap = (scores[:, e] - scores[:, 0]).sort().values
            router.fc.bias[e] -= ((gap[half - 1] + gap[half]) / 2).to(router.fc.bias.dtype)

    for m in model.modules():
        if isinstance(m, PerLayerRouter):
            handles.append(m.register_forward_pre_hook(calibrate))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()


def per_layer_share(model: nn.Module, x: torch.Tensor) -> list[float] | None:
    """Mean share of expert 0 over the per-layer routers' decisions on x (None without per-layer routers)."""
    from advmoe.nn import forward_with_aux

    with torch.no_grad():
        _, aux = forward_with_aux(model, x)
    shares = [float((idx == 0).double().mean()) for idx in aux.routing.values()]
    return [min(shares), sum(shares) / len(shares), max(shares)] if shares else None


LAYOUTS = ("contiguous", "channels_last")


def default_layout(device: torch.device) -> str:
    """channels_last on GPU, contiguous on CPU."""
    return "channels_last" if device.type == "cuda" else "contiguous"


def inference_treatment(
    model: nn.Module, device: torch.device, dtype: torch.dtype, layout: str | None = None
) -> nn.Module:
    """The treatment every benchmarked model gets: eval, device and dtype, the layout (default: channels_last
    on GPU, contiguous on CPU)."""
    model = model.to(device=device, dtype=dtype).eval()
    if (layout or default_layout(device)) == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model


def build_variants(
    name: str,
    ratio: float,
    num_experts: int,
    device: torch.device,
    dtype: torch.dtype,
    backends: Sequence[str],
    router: str = "research",
    variants: Sequence[str] | None = None,
    auto_batch: int = 64,
    layout: str | None = None,
) -> tuple[dict[str, nn.Module], nn.Module]:
    """The models compared for one architecture, on ``device`` in ``dtype``, in eval mode, like for like.

    Every side is BatchNorm-folded where it has BatchNorms after convolutions: dense (``to_sparse`` of the
    dense model), deployed (``to_sparse``), ideal (folded slim network plus the folded router). ``masked``
    and ``sparse[...]`` are the training-form MoE models (unfolded by definition: they are what
    ``to_sparse`` starts from).

    Args:
        router: "research" (one model-level ResNet-20 router) or "per_layer" (one pool+linear router per
            MoE layer).
        variants: names to keep (default: all of dense, masked, sparse[...] ("sparse" selects every backend),
            deployed (auto mode), deployed[pathway], deployed[grouped], deployed[layer] (those the auto row is
            not), ideal, router).
        auto_batch: the batch size at which the ``deployed`` (auto) row picks its form (``to_sparse``);
            ``run_benchmark`` passes its largest batch.
        layout: "contiguous" or "channels_last" for every variant (default: channels_last on GPU, contiguous
            on CPU).

    Returns:
        (name -> module, the MoE model).
    """
    from advmoe.deploy import fold_router, to_sparse
    from advmoe.models import create_model

    if router not in ("research", "per_layer"):
        raise ValueError(f"router must be 'research' or 'per_layer', got {router!r}")
    torch.manual_seed(0)
    dense = create_model(name, ratio=1.0)
    moe_args = {"num_experts": num_experts, "ratio": ratio, "backend": backends[0] if backends else "reference"}
    if router == "per_layer":
        moe_args["router"] = "per_layer"
    moe = create_model(name, **moe_args)
    slim = create_model(name, ratio=ratio)
    moe.to(device=device, dtype=dtype).eval()
    size = image_size(name)
    gen = torch.Generator().manual_seed(1234)
    probe = torch.rand(128 if size <= 64 else 32, moe.config["in_channels"], size, size, generator=gen)
    probe = probe.to(device=device, dtype=dtype)
    if router == "per_layer":
        balance_per_layer_routers(moe, probe)
    else:
        balance_router(moe, probe)
    want = set(variants) if variants is not None else None

    def wanted(key: str) -> bool:
        return want is None or key in want or (key.startswith("sparse[") and "sparse" in want)

    out: dict[str, nn.Module] = {}
    dense = dense.to(device=device, dtype=dtype).eval()
    out["dense"] = to_sparse(dense, example_input=probe[:2])
    if wanted("masked"):
        out["masked"] = to_masked(moe)
    for backend in backends:
        if not wanted(f"sparse[{backend}]"):
            continue
        m = copy.deepcopy(moe)
        for layer in m.modules():
            if hasattr(layer, "backend") and hasattr(layer, "num_experts"):
                layer.backend = backend
                layer.track_usage = False
        out[f"sparse[{backend}]"] = m
    if wanted("deployed"):
        out["deployed"] = to_sparse(moe, example_input=probe[:2], auto_batch=auto_batch)
    auto_mode = getattr(out.get("deployed"), "deploy_mode", None)
    for form in ("pathway", "grouped", "layer") if router == "research" else ():
        if form != auto_mode and wanted(f"deployed[{form}]"):  # the auto row already is that form
            out[f"deployed[{form}]"] = to_sparse(moe, mode=form, example_input=probe[:2])
    slim = to_sparse(slim.to(device=device, dtype=dtype).eval(), example_input=probe[:2])
    folded_router = None
    if getattr(moe, "router", None) is not None:
        folded_router = fold_router(moe.router, moe.normalize(probe[:2]) if moe.normalize is not None else probe[:2])
    if wanted("ideal"):
        out["ideal"] = IdealModel(moe, slim, router=folded_router)
    if wanted("router") and folded_router is not None:
        out["router"] = RouterOnly(moe, router=folded_router)
    for k in list(out):
        out[k] = inference_treatment(out[k], device, dtype, layout)
    return out, moe


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


class RouterOnly(nn.Module):
    """The model-level router with its input normalisation: images (B, C, H, W) -> scores (B, E)."""

    def __init__(self, moe: nn.Module, router: nn.Module | None = None):
        super().__init__()
        self.normalize = copy.deepcopy(moe.normalize)
        self.router = copy.deepcopy(router if router is not None else moe.router)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.router(self.normalize(x) if self.normalize is not None else x)


class IdealModel(nn.Module):
    """The ideal cost: the MoE model's router (with its normalisation) plus the slim dense network.

    Args:
        moe: the MoE model whose router is taken (None or no router: the slim network alone; per-layer
            routers are not counted: pool + linear per layer, negligible FLOPs).
        slim: the dense network of the active width (``create_model(name, ratio=r)``), folded for benchmarks.
        router: the router to use instead of ``moe.router`` (e.g. its BatchNorm-folded copy).
    """

    def __init__(self, moe: nn.Module | None, slim: nn.Module, router: nn.Module | None = None):
        super().__init__()
        has_router = moe is not None and getattr(moe, "router", None) is not None
        self.route = RouterOnly(moe, router) if has_router else None
        self.slim = slim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the slim network; the router runs too (its choice is not needed by the slim net)."""
        if self.route is not None:
            self.route(x).argmax(1)
        return self.slim(x)


def flops_per_image(model: nn.Module, x: torch.Tensor) -> tuple[float, dict[str, int]]:
    """GFLOPs per image (fvcore, one multiply-add = one FLOP) and the operators fvcore could not price.

    ``IdealModel`` is counted as router + slim network (a traced forward would drop the unused router).
    Data movement that fvcore cannot price (index_select/index_copy of the pathway grouping, the masked
    baseline's one_hot/sum) is listed, not counted.
    """
    import warnings

    from advmoe.deploy import GroupedMoE
    from advmoe.flops import flop_breakdown

    parts = [model.route, model.slim] if isinstance(model, IdealModel) and model.route is not None else [model]
    if isinstance(model, IdealModel) and model.route is None:
        parts = [model.slim]
    if isinstance(model, GroupedMoE):  # a trace drops the router (its choice reaches the network via the host)
        norm = [model.normalize] if model.normalize is not None else []
        model.groups.counts = [x.shape[0]] + [0] * (model.num_experts - 1)
        parts = [nn.Sequential(*norm, model.router), nn.Sequential(*norm, model.network)]
    total, unsupported = 0.0, {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for part in parts:
            report = flop_breakdown(part, x)
            total += report.per_image
            for k, v in report.unsupported.items():
                unsupported[k] = unsupported.get(k, 0) + v
    return total / 1e9, unsupported


EXECUTIONS = ("eager", "graph", "compile")
TREATMENT = "BatchNorm folded (dense, ideal, deployed), eval, torch.inference_mode, same dtype"


def provenance(command: str | None = None) -> dict[str, Any]:
    """Commit, dirty flag, command line and library versions, stored with every result file."""
    import platform
    import subprocess
    import sys

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": command if command is not None else " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
    }


def execution_fns(variants: dict[str, nn.Module], x: torch.Tensor, execution: str):
    """Zero-argument callables running each variant on x in the given execution mode.

    Returns:
        (name -> callable, name -> reason for variants that could not be prepared in that mode).
    """
    fns, skipped = {}, {}
    for k, m in variants.items():
        try:
            if execution == "graph":
                from advmoe.deploy import CapturedModel

                m = CapturedModel(m, x)
            elif execution == "compile":
                m = torch.compile(m, mode="reduce-overhead")
            fns[k] = lambda m=m: m(x)
        except Exception as err:  # noqa: BLE001 -- a variant that cannot be captured is reported, not fatal
            skipped[k] = f"{type(err).__name__}: {str(err)[:300]}"
    return fns, skipped


def _backends_for(device: torch.device, requested: Sequence[str] | None) -> list[str]:
    from moe_kernels import available_backends

    present = [b for b in available_backends() if not (b == "triton" and device.type == "cpu")]
    if device.type == "cpu":
        present = [b for b in present if b != "cuda"]
    if requested is None:
        return present
    missing = [b for b in requested if b not in present]
    if missing:
        raise ValueError(f"backends {missing} are not available on {device}; present: {present}")
    return list(requested)


def run_benchmark(
    models: Sequence[str] | None = None,
    batches: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    ratio: float = 0.5,
    num_experts: int = 2,
    warmup: int = 2,
    repeats: int | None = None,
    budget_s: float = 20.0,
    backends: Sequence[str] | None = None,
    quick: bool = False,
    progress: bool = True,
    clock: str = "wall",
    router: str = "research",
    variants: Sequence[str] | None = None,
    execution: str = "eager",
    layout: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Runs the model benchmark and returns the results (the dict written to ``models_bench.json``).

    Args:
        models: zoo names; default the six of docs/deployment.md (``DEFAULT_MODELS``), ``QUICK_MODELS`` if quick.
        batches: batch sizes; default 1, 16, 64 (+256 on GPU); (1, 4) if quick.
        device: "cpu" or "cuda[:i]".
        dtype: "fp32", "bf16" or "fp16".
        ratio, num_experts: MoE width ratio r and E.
        warmup: untimed rounds.
        repeats: timed rounds; None = as many as fit ``budget_s`` per (model, batch), between 3 and 20.
        budget_s: time budget per (model, batch) when repeats is None.
        backends: op backends for the ``sparse[...]`` variants; default every one present on the device.
        quick: tiny mode for CI (resnet10_mini, batches 1 and 4, 2 repeats).
        progress: tqdm progress bar.
        clock: "wall" (latency) or "thread" (CPU time of one thread: sets ``torch.set_num_threads(1)``; for
            machines shared with other jobs, where wall-clock latency is meaningless).
        router: "research" (model-level) or "per_layer" routers for the MoE model.
        variants: variant names to run (see ``build_variants``); default all.
        execution: "eager" (every variant), "graph" (GPU: every variant captured as a CUDA graph per batch
            size with ``advmoe.deploy.CapturedModel``; variants that cannot be captured are recorded as
            skipped) or "compile" (``torch.compile(mode="reduce-overhead")`` on every variant).
        layout: memory format of every variant and input, "contiguous" or "channels_last" (default:
            channels_last on GPU, contiguous on CPU).
        command: the command line to record (default: ``sys.argv``).

    Returns:
        {"device", "device_slug", "settings", "created", "models": [{"model", "image_size", "flops_g",
        "routing_share", "latency": [{"variant", "batch", "median_ms", "min_ms", "iqr_ms", "repeats",
        "vs_dense", "vs_ideal", "vs_masked"}]}]}.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional (e.g. on a bare GPU machine)
        tqdm = None

    device = torch.device(device)
    dtype = parse_dtype(dtype)
    if clock == "thread":
        torch.set_num_threads(1)
    models = list(models or (QUICK_MODELS if quick else DEFAULT_MODELS))
    batches = list(batches or ((1, 4) if quick else default_batches(device)))
    if quick:
        warmup, repeats = 1, repeats or 2
    use_backends = _backends_for(device, backends)
    if execution not in EXECUTIONS or (execution == "graph" and device.type != "cuda"):
        raise ValueError(f"execution must be one of {EXECUTIONS} ('graph' needs a CUDA device), got {execution!r}")
    layout = layout or default_layout(device)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results: dict[str, Any] = {
        "provenance": provenance(command),
        "device": device_description(device) if clock == "wall" else device_description(device) + ", thread CPU time",
        "device_slug": device_slug(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "dtype": _dtype_name(dtype),
            "ratio": ratio,
            "num_experts": num_experts,
            "top_k": 1,
            "router": router,
            "execution": execution,
            "treatment": TREATMENT + f"; {layout} on every side",
            "layout": layout,
            "warmup": warmup,
            "repeats": repeats or "auto",
            "budget_s": budget_s,
            "clock": clock,
            "batches": batches,
            "backends": use_backends,
            "quick": quick,
        },
        "models": [],
    }
    variants_wanted = list(variants) if variants else None
    bar = tqdm(total=len(models) * len(batches), desc="bench", disable=not progress) if tqdm else _NoBar()
    for name in models:
        size = image_size(name) if not quick else 32
        variants, moe = build_variants(
            name,
            ratio,
            num_experts,
            device,
            dtype,
            use_backends,
            router,
            variants_wanted,
            auto_batch=max(batches),
            layout=layout,
        )
        x1 = torch.rand(1, moe.config["in_channels"], size, size, device=device, dtype=dtype)
        flops, unpriced = {}, {}
        try:
            priced = {"sparse": moe, **{k: v for k, v in variants.items() if not k.startswith("sparse")}}
            for key, module in priced.items():
                flops[key], unpriced[key] = flops_per_image(module, x1)
        except ImportError as err:  # fvcore missing: latency only
            flops, unpriced = {}, {"error": str(err)}
        deployed = variants.get("deployed")
        entry = {
            "model": name,
            "image_size": size,
            "flops_g": flops,
            "flops_unpriced_ops": unpriced,
            "deploy_mode": getattr(deployed, "deploy_mode", None),
            "deploy_reason": getattr(deployed, "deploy_reason", None),
            "routing_share": {},
            "skipped": {},
            "latency": [],
        }
        for batch in batches:
            bar.set_postfix_str(f"{name} B={batch}")
            x = torch.rand(batch, moe.config["in_channels"], size, size, device=device, dtype=dtype)
            share = _routing_share(moe, x) if router == "research" else per_layer_share(moe, x)
            entry["routing_share"][str(batch)] = share
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            fns, skipped = execution_fns(variants, x, execution)
            entry["skipped"].update({f"{k}@B={batch}": v for k, v in skipped.items()})
            n = repeats
            if n is None:
                with torch.inference_mode():
                    for fn in fns.values():
                        fn()  # first call (lazy init, compilation) outside the budget estimate
                    begin = time.perf_counter()
                    for fn in fns.values():
                        fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    per_round = time.perf_counter() - begin
                n = int(min(20, max(3, budget_s / max(per_round, 1e-6))))
            with torch.inference_mode():
                timings = time_interleaved(fns, device, warmup=warmup, repeats=n, clock=clock)
            ref = {k: timings[k]["median_ms"] if k in timings else None for k in ("dense", "ideal", "masked")}
            for variant, t in timings.items():
                row = {"variant": variant, "batch": batch, **t}
                for k, v in ref.items():
                    row[f"vs_{k}"] = t["median_ms"] / v if v else None
                entry["latency"].append(row)
            bar.update(1)
        results["models"].append(entry)
        del variants, moe
    bar.close()
    return results
