"""Shared cases and comparison helpers for the op tests (every backend against the reference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    """One op configuration. ``empty_expert`` routes no sample to the last expert."""

    batch: int = 3
    c_in: int = 5
    width: int = 3
    experts: int = 3
    top_k: int = 1
    size: tuple[int, int] = (7, 6)
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    bias: bool = True
    gate: bool = True
    empty_expert: bool = False
    channels_last: bool = False
    non_contiguous: bool = False


CASES = {
    "basic": Case(),
    "no_bias_no_gate": Case(bias=False, gate=False),
    "k_equals_e": Case(top_k=3),
    "k2_of_4": Case(experts=4, top_k=2, batch=5),
    "stride2_pad0": Case(stride=(2, 2), padding=(0, 0), size=(9, 8)),
    "dilation2": Case(dilation=(2, 2), padding=(2, 1), size=(8, 9)),
    "rect_kernel": Case(kernel=(1, 3), padding=(0, 1), stride=(2, 1)),
    "empty_expert": Case(batch=4, empty_expert=True),
    "batch1": Case(batch=1, experts=2),
    "batch0": Case(batch=0),
    "one_expert": Case(experts=1, width=4),
    "channels_last": Case(channels_last=True, c_in=4),
    "non_contiguous": Case(non_contiguous=True),
    "odd_big": Case(batch=5, c_in=17, width=19, experts=2, size=(11, 13)),
}


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0):
    """Returns (x, weight, expert_idx, gate, bias) for a case; float tensors require grad."""
    g = torch.Generator().manual_seed(seed)
    rows = case.experts * case.width
    x = torch.randn(case.batch, case.c_in, *case.size, generator=g, dtype=torch.float64)
    if case.non_contiguous:
        x = torch.randn(case.batch, case.c_in, case.size[1], case.size[0], generator=g, dtype=torch.float64)
        x = x.transpose(2, 3)
    weight = torch.randn(rows, case.c_in, *case.kernel, generator=g, dtype=torch.float64) / (case.c_in**0.5)
    high = case.experts - 1 if case.empty_expert and case.experts > 1 else case.experts
    scores = torch.rand(case.batch, high, generator=g)
    expert_idx = scores.argsort(dim=1, descending=True)[:, : case.top_k] if case.top_k <= high else None
    if expert_idx is None:
        expert_idx = torch.randperm(case.experts, generator=g)[: case.top_k].repeat(case.batch, 1)
    gate = torch.rand(case.batch, case.top_k, generator=g, dtype=torch.float64) + 0.5 if case.gate else None
    bias = torch.randn(rows, generator=g, dtype=torch.float64) if case.bias else None

    def prep(t):
        if t is None:
            return None
        return t.to(device=device, dtype=dtype).requires_grad_()

    x = x.to(device=device, dtype=dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    return x, prep(weight), expert_idx.to(device), prep(gate), prep(bias)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """allclose with the max and mean absolute difference in the failure message."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    ok = bool((diff <= atol + rtol * expected.double().abs()).all()) if diff.numel() else True
    assert ok, f"{what}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e} (atol {atol}, rtol {rtol})"


def custom_op_args(case: Case, inputs: tuple, backend: str, plan: list | None = None) -> tuple:
    """Positional arguments of ``torch.ops.moe_kernels.sparse_moe_conv2d`` for a case's ``make_inputs`` output
    (activation "none"; ``plan``: the ``RoutingPlan.tensors()`` list, default none)."""
    x, weight, expert_idx, gate, bias = inputs
    stride, padding, dilation = list(case.stride), list(case.padding), list(case.dilation)
    return (x, weight, expert_idx, gate, bias, case.experts, stride, padding, dilation, "none", backend, plan or [])


# (x, weight, bias, gate) gradient subsets a backward is asked for: one input alone, then two together
GRAD_SUBSETS = {
    "x": (True, False, False, False),
    "weight": (False, True, False, False),
    "bias": (False, False, True, False),
    "gate": (False, False, False, True),
    "weight_bias": (False, True, True, False),
    "x_gate": (True, False, False, True),
}
SINGLE_GRADS = ["x", "weight", "bias", "gate"]
