"""The routing plan: contents against a naive computation, stale plans refused, the op with and without a
shared plan identical on every CPU backend, one plan per model forward, and no host sync on the Triton path."""

from __future__ import annotations

import pytest
import torch
from helpers.op_cases import CASES, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import moe_kernels
from advmoe.nn import SparseMoEConv2d
from moe_kernels import RoutingPlan, sparse_moe_conv2d
from moe_kernels._triton.schedule import build_tile_schedule
from moe_kernels.plan import INDEX_CHECK_ENV, check_expert_idx_values, index_check_mode

CPU_BACKENDS = ["reference", "cpu", "triton", "slices"]


def _naive(expert_idx: list[list[int]], num_experts: int):
    """Sorted slots, counts and offsets computed one slot at a time."""
    top_k = len(expert_idx[0]) if expert_idx else 1
    flat = [e for row in expert_idx for e in row]
    order = sorted(range(len(flat)), key=lambda s: (flat[s], s))
    counts = [flat.count(e) for e in range(num_experts)]
    offsets = [sum(counts[:e]) for e in range(num_experts + 1)]
    return order, [s // top_k for s in order], [s % top_k for s in order], counts, offsets


SHAPES = {
    "b0": (torch.zeros(0, 1, dtype=torch.int64), 3),
    "b1": (torch.tensor([[1]]), 2),
    "empty_expert": (torch.tensor([[0], [2], [0], [2], [2]]), 4),
    "k_equals_e": (torch.tensor([[2, 0, 1], [1, 2, 0]]), 3),
    "k2_int32": (torch.tensor([[3, 1], [1, 0], [3, 0], [1, 3]], dtype=torch.int32), 5),
    "one_expert": (torch.zeros(4, 1, dtype=torch.int64), 1),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_plan_matches_naive(name):
    expert_idx, num_experts = SHAPES[name]
    plan = RoutingPlan.build(expert_idx, num_experts)
    order, sample, slot, counts, offsets = _naive(expert_idx.tolist(), num_experts)
    assert plan.order.tolist() == order
    assert plan.sample.tolist() == sample and plan.slot.tolist() == slot
    assert plan.counts.tolist() == counts and plan.offsets.tolist() == offsets
    assert plan.order.dtype == plan.counts.dtype == plan.offsets.dtype == torch.int64
    assert (plan.batch, plan.top_k, plan.num_experts) == (*expert_idx.shape, num_experts)
    assert plan.ranges() == [(e, offsets[e], offsets[e + 1]) for e in range(num_experts) if counts[e] > 0]
    # The tile table is the schedule of the counts, sized by the upper bound, cached per geometry.
    for rows_per_slot, block_rows in ((7, 4), (1, 16)):
        tiles = plan.tile_schedule(rows_per_slot, block_rows)
        want = build_tile_schedule(torch.tensor(counts), len(order), rows_per_slot, block_rows)
        assert tiles.num_tiles == -(-len(order) * rows_per_slot // block_rows) + num_experts
        for field in ("tile_expert", "tile_start", "tile_end"):
            assert torch.equal(getattr(tiles, field), getattr(want, field)), field
        assert plan.tile_schedule(rows_per_slot, block_rows) is tiles


def test_group_by_expert_is_the_plan():
    expert_idx = torch.tensor([[1, 0], [0, 1]])
    groups = moe_kernels.group_by_expert(expert_idx, 2)
    assert isinstance(groups, RoutingPlan) and moe_kernels.ExpertGroups is RoutingPlan
    assert groups.sample.tolist() == [0, 1, 0, 1] and groups.slot.tolist() == [1, 0, 0, 1]
    assert moe_kernels.expert_usage(expert_idx, 3).tolist() == [0.5, 0.5, 0.0]
    assert moe_kernels.expert_usage(torch.zeros(0, 1, dtype=torch.int64), 2).tolist() == [0.0, 0.0]


def test_bad_plan_input():
    with pytest.raises(ValueError, match="expert_idx values must be in"):
        RoutingPlan.build(torch.tensor([[0], [3]]), 3)
    with pytest.raises(TypeError, match="int64"):
        RoutingPlan.build(torch.zeros(2, 1), 2)
    with pytest.raises(ValueError, match=r"\(B, k\)"):
        RoutingPlan.build(torch.zeros(2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="num_experts"):
        RoutingPlan.build(torch.zeros(2, 1, dtype=torch.int64), 0)


def test_index_check_modes(monkeypatch):
    bad = torch.tensor([[0], [-1]])
    assert index_check_mode(None, torch.device("cpu")) == "host"
    assert index_check_mode(None, torch.device("cuda")) == "device"
    with pytest.raises(RuntimeError, match=r"expert_idx values must be in \[0, 2\)"):
        check_expert_idx_values(bad, 2, check="device")  # torch._assert_async; on a GPU a device-side assert
    monkeypatch.setenv(INDEX_CHECK_ENV, "host")
    assert index_check_mode(None, torch.device("cuda")) == "host"
    with pytest.raises(ValueError, match=r"got values in \[-1, 0\]"):
        RoutingPlan.build(bad, 2)
    monkeypatch.setenv(INDEX_CHECK_ENV, "sometimes")
    with pytest.raises(ValueError, match=INDEX_CHECK_ENV):
        RoutingPlan.build(bad, 2)
    with pytest.raises(ValueError, match="check must be one of"):
        RoutingPlan.build(bad, 2, check="never")


def test_stale_plan_is_refused():
    case = CASES["k2_of_4"]
    x, weight, expert_idx, gate, bias = make_inputs(case)

    def call(idx, plan, experts=case.experts, w=weight):
        return sparse_moe_conv2d(x[: idx.shape[0]], w, idx, experts, padding=1, backend="reference", plan=plan)

    plan = RoutingPlan.build(expert_idx, case.experts)
    with pytest.raises(ValueError, match="batch size 5 but the call has batch size 4"):
        call(expert_idx[:4], RoutingPlan.build(expert_idx, case.experts))
    with pytest.raises(ValueError, match="k 2 but the call has k 1"):
        call(expert_idx[:, :1], plan)
    with pytest.raises(ValueError, match="num_experts 4 but the call has num_experts 2"):
        call(expert_idx % 2, RoutingPlan.build(expert_idx % 2, 4), experts=2)
    with pytest.raises(ValueError, match="another expert_idx tensor"):
        call(expert_idx.clone(), plan)
    with pytest.raises(TypeError, match="plan must be a moe_kernels.RoutingPlan"):
        call(expert_idx, plan.tensors())
    with pytest.raises(ValueError, match="device cpu but the call has device meta"):
        plan.check_matches(case.batch, case.top_k, case.experts, torch.device("meta"))
    # The registered op checks the plan tensors' sizes itself.
    args = (x, weight, expert_idx, gate, bias, case.experts, [1, 1], [1, 1], [1, 1], "none", "reference")
    with pytest.raises(ValueError, match="stale routing plan"):
        torch.ops.moe_kernels.sparse_moe_conv2d(*args, RoutingPlan.build(expert_idx[:4], case.experts).tensors())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case_name", ["k2_of_4", "empty_expert"])
def test_shared_plan_gives_identical_results(backend, case_name):
    case = CASES[case_name]
    results = []
    for shared in (False, True):
        x, weight, expert_idx, gate, bias = make_inputs(case)
        g = torch.Generator().manual_seed(2)
        weight2 = torch.randn(case.experts * case.width, case.top_k * case.width, 1, 3, generator=g)
        weight2.requires_grad_()
        plan = RoutingPlan.build(expert_idx, case.experts) if shared else None
        # Two layers on the same routing (the second reuses the plan, and its cached tile tables).
        y = sparse_moe_conv2d(x, weight, expert_idx, case.experts, gate, bias, padding=1, backend=backend, plan=plan)
        y2 = sparse_moe_conv2d(y, weight2, expert_idx, case.experts, gate, None, stride=2, backend=backend, plan=plan)
        grads = torch.autograd.grad((y.square().sum() + y2.sum()), (x, weight, weight2, gate, bias))
        results.append((y.detach(), y2.detach(), *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def _moe_model():
    """A small zoo model whose MoE layers are all driven by one model-level router."""
    from advmoe.models import create_model

    torch.manual_seed(0)
    return create_model("resnet10_mini", num_experts=2, ratio=0.5, router="research", backend="reference").eval()


def test_model_forward_builds_one_plan(monkeypatch):
    built = []
    original = RoutingPlan.build.__func__

    def counting_build(cls, *args, **kwargs):
        built.append(args[0].shape)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(RoutingPlan, "build", classmethod(counting_build))
    model = _moe_model()
    layers = [m for m in model.modules() if isinstance(m, SparseMoEConv2d)]
    assert len(layers) > 2
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert len(built) == 1, f"one model-level routing must build one plan per forward, built {len(built)}"
    with torch.no_grad():
        model(x)
    assert len(built) == 2


class _HostSyncCounter(TorchDispatchMode):
    """Counts the aten ops that read device memory on the host or copy it there."""

    SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::is_nonzero", "aten::equal")

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        copies_to_host = name in ("aten::_to_copy", "aten::copy_") and any(
            isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args
        )
        if name in self.SYNCING or copies_to_host:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def _tensor_read_spy(monkeypatch, reads):
    for method in ("item", "tolist", "cpu", "numpy", "__int__", "__bool__", "__index__", "__float__"):
        original = getattr(torch.Tensor, method)

        def spy(self, *a, _original=original, _method=method, **k):
            reads.append(_method)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, method, spy)


@pytest.mark.parametrize("prebuilt_plan", [False, True], ids=["plan_in_op", "shared_plan"])
def test_triton_path_has_no_host_sync(monkeypatch, prebuilt_plan):
    """Under the interpreter the tensors live on the CPU, but the Triton path runs the code it runs on a GPU:
    with the device index check (what "auto" picks for CUDA tensors) it reads nothing on the host."""
    if "triton" not in moe_kernels.available_backends():
        pytest.skip(moe_kernels.unavailable_reason("triton"))
    monkeypatch.setenv(INDEX_CHECK_ENV, "device")
    case = CASES["k2_of_4"]
    x, weight, expert_idx, gate, bias = make_inputs(case)
    plan = RoutingPlan.build(expert_idx, case.experts) if prebuilt_plan else None
    sparse_moe_conv2d(x, weight, expert_idx, case.experts, gate, bias, padding=1, backend="triton")  # warm-up
    reads: list[str] = []
    counter = _HostSyncCounter()
    # The interpreter itself converts arguments to numpy; count only what the op's Python code does.
    import triton.runtime.interpreter as interp

    monkeypatch.setattr(interp.GridExecutor, "__call__", _unspied(interp.GridExecutor.__call__, reads))
    _tensor_read_spy(monkeypatch, reads)
    with counter:
        y = sparse_moe_conv2d(x, weight, expert_idx, case.experts, gate, bias, padding=1, backend="triton", plan=plan)
        grads = torch.autograd.grad(y.square().sum(), (x, weight, gate, bias))
    monkeypatch.undo()
    assert len(grads) == 4
    assert counter.syncs == [], f"host syncs on the Triton path: {counter.syncs}"
    assert reads == [], f"host reads of tensors on the Triton path: {reads}"


def test_host_sync_counter_sees_a_sync(monkeypatch):
    """The counter of the test above is not blind: the host index check reads the indices."""
    counter, reads = _HostSyncCounter(), []
    _tensor_read_spy(monkeypatch, reads)
    with counter:
        RoutingPlan.build(torch.tensor([[0], [1]]), 2, check="host")
    monkeypatch.undo()
    assert "aten::_local_scalar_dense" in counter.syncs and "__int__" in reads


def _unspied(call, reads):
    """Runs a Triton interpreter launch with the tensor-read spies switched off (its own numpy copies)."""

    def wrapper(self, *args, **kwargs):
        saved = list(reads)
        try:
            return call(self, *args, **kwargs)
        finally:
            reads[:] = saved

    return wrapper


@pytest.mark.parametrize("top_k", [1, 2])
def test_slices_backend_on_a_batch_grouped_by_expert(top_k):
    """A batch already grouped by expert runs on slices of x and of the output (no gather); results and
    gradients match the reference."""
    experts, width = 3, 4
    expert_idx = torch.tensor([[0, 1], [0, 1], [2, 1], [2, 1], [2, 1]])[:, :top_k].contiguous()
    plan = RoutingPlan.build(expert_idx, experts)
    groups = plan.host_groups()
    if top_k == 1:
        assert groups == [(0, 0, 2, 0, 0), (2, 2, 5, 2, 0)]
    else:  # expert 1 serves every sample at slot 1: a slice too; experts 0 and 2 at slot 0
        assert groups == [(0, 0, 2, 0, 0), (1, 2, 7, 0, 1), (2, 7, 10, 2, 0)]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(experts * width, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gate = (torch.rand(5, top_k, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(experts * width, generator=g, dtype=torch.float64, requires_grad=True)
    got = sparse_moe_conv2d(x, weight, expert_idx, experts, gate, bias, padding=1, backend="slices", plan=plan)
    want = moe_kernels.sparse_moe_conv2d_ref(x, weight, expert_idx, experts, gate, bias, (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(got, want)
    grad = torch.randn(got.shape, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad(got, (x, weight, gate, bias), grad),
        torch.autograd.grad(want, (x, weight, gate, bias), grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_scattered_batch_is_not_a_slice_and_one_host_read_per_plan(monkeypatch):
    plan = RoutingPlan.build(torch.tensor([[1], [0], [1], [1]]), 2)
    reads = []
    _tensor_read_spy(monkeypatch, reads)
    assert plan.host_groups() == [(0, 0, 1, 1, 0), (1, 1, 4, -1, 0)]  # samples 0, 2, 3: not consecutive
    assert plan.ranges() == [(0, 0, 1), (1, 1, 4)] and plan.host_offsets() == [0, 1, 4]
    monkeypatch.undo()
    assert reads == ["tolist"], f"expected one host read per plan, got {reads}"
