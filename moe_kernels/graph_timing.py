"""Device time of a callable from replaying a CUDA graph of many calls (GPU only; the benchmarks' device timer).

Replaying one graph of N calls removes the host's launch overhead and idle gaps between calls, so the time per
call is what the GPU spends on the work itself. Used by ``benchmarks/bench_op.py`` (benchmark v2) and
``moe_kernels._triton.bench_slim``; eager latencies come from ``advmoe.bench.timing``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def capture_cuda_graph(fn: Callable[[], object], calls: int, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls of ``fn``, after ``warmup`` calls on a side stream (autotuning, caches).

    Raises:
        Whatever capture raises, e.g. when ``fn`` reads device memory on the host (a sync is not capturable).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def graph_replay_ms(graph: torch.cuda.CUDAGraph, calls: int, replays: int) -> float:
    """Median over ``replays`` replays of ``graph`` (CUDA events) of the milliseconds per call (``calls`` per graph)."""
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def cuda_graph_ms(fn: Callable[[], object], calls: int = 20, replays: int = 30) -> float:
    """Device milliseconds per call of ``fn``: a graph of ``calls`` calls, median of ``replays`` replays."""
    return graph_replay_ms(capture_cuda_graph(fn, calls), calls, replays)
