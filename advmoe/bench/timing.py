"""Latency measurement (the project's one timer): warm-up, then interleaved repeats, medians.

All candidates of one comparison are timed in the same process, on the same device and input, in
round-robin order (one call of each per round), so that background load and clock changes hit every
candidate alike. On CUDA every call is bracketed by CUDA events; on CPU by ``time.perf_counter``.

Used by ``advmoe bench``, ``advmoe demo``, ``to_sparse(mode="auto")`` and the scripts in ``benchmarks/``;
results folders are named by :func:`device_slug` (``benchmarks/results/cpu-2core`` on a 2-thread CPU).
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["device_description", "device_slug", "median_ms", "synchronize", "time_interleaved", "time_once"]


def synchronize(device: str | torch.device) -> None:
    """Waits for the device's queued work (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> float:
    """Seconds one call of ``fn`` takes (device work included); ``clock="thread"``: CPU time of this thread."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    timer = time.thread_time if clock == "thread" else time.perf_counter
    begin = timer()
    fn()
    return timer() - begin


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
    min_time_s: float = 0.0,
    clock: str = "wall",
    no_grad: bool = True,
) -> dict[str, dict[str, float]]:
    """Median latency of each candidate, measured round-robin.

    Args:
        candidates: name -> zero-argument callable (e.g. ``lambda: model(x)``).
        device: where the callables run (CUDA is synchronised around each call).
        warmup: untimed calls of each candidate first (also round-robin).
        repeats: timed rounds; each round calls every candidate once.
        min_time_s: keep adding rounds (up to 5x ``repeats``) until the slowest candidate has run this long.
        clock: "wall" (latency) or "thread" (CPU time of the calling thread; CPU only, meaningful with
            ``torch.set_num_threads(1)``: a cost measure that stays stable on a machine shared with other jobs).
        no_grad: run the candidates under ``torch.no_grad()`` (default); False keeps the caller's grad mode
            (for timing backward passes).

    Returns:
        name -> {"median_ms", "min_ms", "iqr_ms", "repeats"}.
    """
    if clock not in ("wall", "thread") or (clock == "thread" and device.type != "cpu"):
        raise ValueError(f"clock must be 'wall', or 'thread' on CPU, got {clock!r} on {device}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        return _interleaved(candidates, device, warmup, repeats, min_time_s, clock)


def _interleaved(candidates, device, warmup, repeats, min_time_s, clock) -> dict[str, dict[str, float]]:
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    rounds = 0
    while rounds < repeats or (
        min_time_s > 0 and rounds < 5 * repeats and max(sum(s) for s in samples.values()) < min_time_s
    ):
        for name, fn in candidates.items():
            samples[name].append(time_once(fn, device, clock))
        rounds += 1
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
        out[name] = {
            "median_ms": 1e3 * statistics.median(s),
            "min_ms": 1e3 * min(s),
            "iqr_ms": 1e3 * (q[2] - q[0]),
            "repeats": len(s),
        }
    return out


def median_ms(
    candidates: dict[str, Callable[[], object]],
    device: str | torch.device = "cpu",
    reps: int = 20,
    warmup: int = 3,
    min_time_s: float = 0.0,
) -> dict[str, float]:
    """Median milliseconds per call of each candidate: :func:`time_interleaved` reduced to its medians
    (the caller's grad mode is kept, so backward passes can be timed).

    Args:
        candidates: name -> zero-argument callable doing one complete unit of work.
        device: where the work runs.
        reps: timed rounds.
        warmup: untimed rounds first.
        min_time_s: keep adding rounds (up to 5x ``reps``) until the slowest candidate has run this long.

    Returns:
        name -> median time in milliseconds.
    """
    device = torch.device(device)
    stats = time_interleaved(candidates, device, warmup=warmup, repeats=reps, min_time_s=min_time_s, no_grad=False)
    return {name: s["median_ms"] for name, s in stats.items()}


def device_slug(device: str | torch.device) -> str:
    """A short folder name for the machine: ``cpu-<torch threads>core`` (e.g. ``cpu-2core``) or the GPU's
    name, e.g. ``nvidia-h100``. Every results folder under ``benchmarks/results/`` is named by it."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for junk in ("nvidia ", " 80gb", " hbm3", " pcie", " sxm5", " nvl"):
            name = name.replace(junk, " ")
        return "nvidia-" + "-".join(name.split())
    return f"cpu-{torch.get_num_threads()}core"


def device_description(device: str | torch.device) -> str:
    """A human-readable description of the device, for tables."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"
