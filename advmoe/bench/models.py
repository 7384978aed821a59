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

CIFAR_MODELS = ("resnet18_cifar", "wrn_28_10_cifar", "vgg16_bn", "densenet_cifar")
IMAGENET_MODELS = ("resnet18_imagenet", "resnet50_imagenet")
DEFAULT_MODELS = CIFAR_MODELS + IMAGENET_MODELS
QUICK_MODELS = ("resnet10_mini",)
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


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


def build_variants(
    name: str, ratio: float, num_experts: int, device: torch.device, dtype: torch.dtype, backends: Sequence[str]
) -> tuple[dict[str, nn.Module], nn.Module]:
    """The models compared for one architecture, on ``device`` in ``dtype``, in eval mode.

    Returns:
        (name -> module, the MoE model) where "ideal" is a ``nn.Sequential``-free pair (router, slim net)
        wrapped in one module.
    """
    from advmoe.deploy import to_sparse
    from advmoe.models import create_model

    torch.manual_seed(0)
    dense = create_model(name, ratio=1.0)
    moe = create_model(name, num_experts=num_experts, ratio=ratio, backend=backends[0] if backends else "reference")
    slim = create_model(name, ratio=ratio)
    variants: dict[str, nn.Module] = {"dense": dense}
    moe.to(device=device, dtype=dtype).eval()
    size = image_size(name)
    probe = torch.rand(128 if size <= 64 else 32, moe.config["in_channels"], size, size, device=device, dtype=dtype)
    balance_router(moe, probe)
    variants["masked"] = to_masked(moe)
    for backend in backends:
        m = copy.deepcopy(moe)
        for layer in m.modules():
            if hasattr(layer, "backend") and hasattr(layer, "num_experts"):
                layer.backend = backend
                layer.track_usage = False
        variants[f"sparse[{backend}]"] = m
    variants["deployed"] = to_sparse(moe, example_input=probe[:2])
    if variants["deployed"].deploy_mode == "pathway":
        variants["deployed[layer]"] = to_sparse(moe, mode="layer", example_input=probe[:2])
    variants["ideal"] = IdealModel(moe, slim)
    for m in variants.values():
        m.to(device=device, dtype=dtype).eval()
    return variants, moe


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


class RouterOnly(nn.Module):
    """The model-level router with its input normalisation: images (B, C, H, W) -> scores (B, E)."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.normalize = copy.deepcopy(moe.normalize)
        self.router = copy.deepcopy(moe.router)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.router(self.normalize(x) if self.normalize is not None else x)


class IdealModel(nn.Module):
    """The ideal cost: the MoE model's router (with its normalisation) plus the slim dense network.

    Args:
        moe: the MoE model whose router is taken (None or no router: the slim network alone).
        slim: the dense network of the active width (``create_model(name, ratio=r)``).
    """

    def __init__(self, moe: nn.Module | None, slim: nn.Module):
        super().__init__()
        has_router = moe is not None and getattr(moe, "router", None) is not None
        self.route = RouterOnly(moe) if has_router else None
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

    from advmoe.flops import flop_breakdown

    parts = [model.route, model.slim] if isinstance(model, IdealModel) and model.route is not None else [model]
    if isinstance(model, IdealModel) and model.route is None:
        parts = [model.slim]
    total, unsupported = 0.0, {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for part in parts:
            report = flop_breakdown(part, x)
            total += report.per_image
            for k, v in report.unsupported.items():
                unsupported[k] = unsupported.get(k, 0) + v
    return total / 1e9, unsupported


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
) -> dict[str, Any]:
    """Runs the model benchmark and returns the results (the dict written to ``models_bench.json``).

    Args:
        models: zoo names; default the six of the README (``DEFAULT_MODELS``), ``QUICK_MODELS`` if quick.
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
    results: dict[str, Any] = {
        "device": device_description(device) if clock == "wall" else device_description(device) + ", thread CPU time",
        "device_slug": device_slug(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "dtype": _dtype_name(dtype),
            "ratio": ratio,
            "num_experts": num_experts,
            "top_k": 1,
            "router": "research",
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
    bar = tqdm(total=len(models) * len(batches), desc="bench", disable=not progress) if tqdm else _NoBar()
    for name in models:
        size = image_size(name) if not quick else 32
        variants, moe = build_variants(name, ratio, num_experts, device, dtype, use_backends)
        x1 = torch.rand(1, moe.config["in_channels"], size, size, device=device, dtype=dtype)
        flops, unpriced = {}, {}
        try:
            for key, module in (("dense", variants["dense"]), ("masked", variants["masked"]), ("sparse", moe),
                                ("deployed", variants["deployed"]), ("ideal", variants["ideal"])):  # fmt: skip
                flops[key], unpriced[key] = flops_per_image(module, x1)
        except ImportError as err:  # fvcore missing: latency only
            flops, unpriced = {}, {"error": str(err)}
        entry = {"model": name, "image_size": size, "flops_g": flops, "flops_unpriced_ops": unpriced,
                 "deploy_mode": variants["deployed"].deploy_mode, "routing_share": {}, "latency": []}  # fmt: skip
        for batch in batches:
            bar.set_postfix_str(f"{name} B={batch}")
            x = torch.rand(batch, moe.config["in_channels"], size, size, device=device, dtype=dtype)
            entry["routing_share"][str(batch)] = _routing_share(moe, x)
            fns = {k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}
            n = repeats
            if n is None:
                with torch.inference_mode():
                    begin = time.perf_counter()
                    for fn in fns.values():
                        fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    per_round = time.perf_counter() - begin
                n = int(min(20, max(3, budget_s / max(per_round, 1e-6))))
            timings = time_interleaved(fns, device, warmup=warmup, repeats=n, clock=clock)
            dense_ms, ideal_ms = timings["dense"]["median_ms"], timings["ideal"]["median_ms"]
            for variant, t in timings.items():
                entry["latency"].append({"variant": variant, "batch": batch, **t,
                                         "vs_dense": t["median_ms"] / dense_ms, "vs_ideal": t["median_ms"] / ideal_ms,
                                         "vs_masked": t["median_ms"] / timings["masked"]["median_ms"]})  # fmt: skip
            bar.update(1)
        results["models"].append(entry)
        del variants, moe
    bar.close()
    return results
