"""Timing helpers shared by the benchmarks: interleaved medians after warm-up, device names and slugs.

All candidates of one comparison are timed in the same process, on the same device, with the same
inputs, in interleaved rounds (the order rotates every round), so slow drifts of the machine (other
jobs, clocks) hit them alike. CPU times come from ``time.perf_counter``; GPU times from CUDA events
recorded around each call.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
from collections.abc import Callable

import torch

from advmoe.bench.timing import _time_once as time_once_seconds


def device_slug(device: str | torch.device) -> str:
    """Short folder name of a device, e.g. ``cpu-2core`` (intra-op threads) or ``nvidia-h100``."""
    device = torch.device(device)
    if device.type == "cuda":
        tokens = re.sub(r"[^a-z0-9]+", " ", torch.cuda.get_device_name(device).lower()).split()
        return "-".join(tokens[:2]) if tokens else "cuda"
    return f"cpu-{torch.get_num_threads()}core"


def device_description(device: str | torch.device) -> str:
    """Human-readable description of the device and software, for result files."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hw = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        hw = f"{_cpu_model()} ({os.cpu_count()} cores visible), {torch.get_num_threads()} torch threads"
    return f"{hw}; torch {torch.__version__}; Python {platform.python_version()}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def synchronize(device: str | torch.device) -> None:
    """Waits for the device's queued work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: str | torch.device = "cpu",
    reps: int = 20,
    warmup: int = 3,
    min_time_s: float = 0.0,
) -> dict[str, float]:
    """Median milliseconds per call of each function, measured in interleaved rounds.

    Args:
        fns: name -> zero-argument callable doing one complete unit of work.
        device: where the work runs; CUDA work is timed with CUDA events.
        reps: rounds (each round calls every function once, in a rotating order).
        warmup: untimed calls of each function first.
        min_time_s: keep adding rounds (up to 10 * reps) until this much time was measured in total.

    Returns:
        name -> median time in milliseconds.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    device = torch.device(device)
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    total, rounds = 0.0, 0
    while rounds < reps or (total < min_time_s and rounds < 10 * reps):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            ms = _time_once(fns[name], device)
            samples[name].append(ms)
            total += ms / 1e3
        rounds += 1
    return {name: statistics.median(v) for name, v in samples.items()}


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call (CUDA events on GPU, wall clock on CPU); shares advmoe.bench's timer."""
    return time_once_seconds(fn, device) * 1e3
