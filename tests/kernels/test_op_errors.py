"""Bad input to sparse_moe_conv2d raises a clear TypeError/ValueError naming the argument, on every
CPU-testable backend (docs/op.md, "Contract"); the compiled ops raise RuntimeError when called directly."""

import pytest
import torch

import moe_kernels
from moe_kernels import sparse_moe_conv2d

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["reference", "cpu", "triton"]


def _backends():
    present = moe_kernels.available_backends()
    return [pytest.param(b, marks=pytest.mark.skipif(b not in present, reason=f"{b} not built")) for b in BACKENDS]


def _good(batch=2, c_in=3, width=4, experts=2, top_k=1, size=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=g, dtype=dtype)
    weight = torch.randn(experts * width, c_in, 3, 3, generator=g, dtype=dtype)
    expert_idx = torch.arange(batch * top_k).reshape(batch, top_k) % experts
    gate = torch.ones(batch, top_k, dtype=dtype)
    bias = torch.zeros(experts * width, dtype=dtype)
    return {"x": x, "weight": weight, "expert_idx": expert_idx, "num_experts": experts, "gate": gate, "bias": bias}


def _call(backend, padding=1, **overrides):
    args = _good()
    args.update(overrides)
    return sparse_moe_conv2d(**args, padding=padding, backend=backend)


BAD = {
    # name: (overrides, exception, words the message must contain)
    "x_rank3": ({"x": torch.randn(3, 6, 6)}, ValueError, "x must have shape"),
    "weight_rank2": ({"weight": torch.randn(8, 3)}, ValueError, "weight must have shape"),
    "x_int": ({"x": torch.ones(2, 3, 6, 6, dtype=torch.int64)}, TypeError, "x must be a floating"),
    "weight_dtype": ({"weight": torch.randn(8, 3, 3, 3, dtype=torch.float64)}, TypeError, "weight dtype"),
    "bias_dtype": ({"bias": torch.zeros(8, dtype=torch.float64)}, TypeError, "bias dtype"),
    "idx_float": ({"expert_idx": torch.zeros(2, 1)}, TypeError, "expert_idx must be an int64"),
    "idx_too_big": ({"expert_idx": torch.tensor([[0], [2]])}, ValueError, "expert_idx values"),
    "idx_negative": ({"expert_idx": torch.tensor([[-1], [0]])}, ValueError, "expert_idx values"),
    "idx_rank1": ({"expert_idx": torch.tensor([0, 1])}, ValueError, "expert_idx must have shape"),
    "idx_batch": ({"expert_idx": torch.tensor([[0], [1], [0]])}, ValueError, "expert_idx has batch"),
    "idx_k0": ({"expert_idx": torch.zeros(2, 0, dtype=torch.int64)}, ValueError, "k >= 1"),
    "rows_not_divisible": ({"num_experts": 3}, ValueError, "num_experts=3"),
    "num_experts_zero": ({"num_experts": 0}, ValueError, "num_experts must be >= 1"),
    "num_experts_float": ({"num_experts": 2.0}, TypeError, "num_experts must be an int"),
    "c_in_mismatch": ({"weight": torch.randn(8, 5, 3, 3)}, ValueError, "C_in=5"),
    "gate_shape": ({"gate": torch.ones(2, 2)}, ValueError, "gate must have shape"),
    "gate_int": ({"gate": torch.ones(2, 1, dtype=torch.int64)}, TypeError, "gate must be a floating"),
    "bias_shape": ({"bias": torch.zeros(4)}, ValueError, "bias must have shape"),
    "stride_zero": ({"stride": 0}, ValueError, "stride must be >= 1"),
    "dilation_zero": ({"dilation": (1, 0)}, ValueError, "dilation must be >= 1"),
    "padding_negative": ({"padding": -1}, ValueError, "padding must be >= 0"),
    "stride_triple": ({"stride": (1, 1, 1)}, TypeError, "stride must be an int or a pair"),
    "stride_bool": ({"stride": True}, TypeError, "stride"),
    "output_too_small": ({"x": torch.randn(2, 3, 2, 2), "padding": 0}, ValueError, "output size"),
    "x_not_tensor": ({"x": [[1.0]]}, TypeError, "x must be a torch.Tensor"),
}


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_clear_error(backend, name):
    overrides, exc, words = BAD[name]
    with pytest.raises(exc, match=words):
        _call(backend, **overrides)


@pytest.mark.parametrize("backend", _backends())
def test_unknown_backend_and_activation(backend):
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        _call("nope")
    with pytest.raises(ValueError, match="activation must be one of"):
        sparse_moe_conv2d(**_good(), padding=1, backend=backend, activation="gelu")
    with pytest.raises(TypeError, match="backend must be a str"):
        _call(3)


def test_device_mismatch_without_gpu():
    """A meta weight with a CPU input is a device mismatch on any machine."""
    args = _good()
    args["weight"] = args["weight"].to("meta")
    with pytest.raises(ValueError, match="one device"):
        sparse_moe_conv2d(**args, padding=1, backend="reference")


@pytest.mark.cuda
def test_device_mismatch_cuda():
    args = _good()
    args["x"] = args["x"].cuda()
    with pytest.raises(ValueError, match="one device"):
        sparse_moe_conv2d(**args, padding=1)


@pytest.mark.parametrize("backend", _backends())
def test_batch0_is_valid(backend):
    args = _good(batch=0)
    for name in ("x", "weight", "gate", "bias"):
        args[name].requires_grad_()
    y = sparse_moe_conv2d(**args, padding=1, backend=backend)
    assert y.shape == (0, 4, 6, 6)
    y.sum().backward()
    assert args["x"].grad.shape == args["x"].shape
    for name in ("weight", "bias"):
        assert torch.count_nonzero(args[name].grad) == 0, f"{name} grad must be zero for an empty batch"


@pytest.mark.parametrize("backend", _backends())
def test_nan_propagates_to_its_sample_only(backend):
    args = _good(batch=3, size=5)
    args["expert_idx"] = torch.tensor([[0], [1], [0]])
    args["gate"] = torch.ones(3, 1)
    args["x"][1, 0, 2, 2] = float("nan")
    y = sparse_moe_conv2d(**args, padding=1, backend=backend)
    assert torch.isnan(y[1]).any(), "a NaN input must show in its own sample's output"
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all(), "a NaN must not leak into other samples"


# Direct calls of the compiled op: the C++ side checks everything again (no crash, no silent OOB).
_DIRECT_BAD = {
    "idx_too_big": {"expert_idx": torch.tensor([[0], [5]])},
    "idx_negative": {"expert_idx": torch.tensor([[0], [-3]])},
    "idx_huge": {"expert_idx": torch.tensor([[0], [2**40]])},
    "idx_float": {"expert_idx": torch.zeros(2, 1)},
    "idx_batch": {"expert_idx": torch.zeros(5, 1, dtype=torch.int64)},
    "rows": {"num_experts": 3},
    "num_experts_zero": {"num_experts": 0},
    "gate_shape": {"gate": torch.ones(7)},
    "bias_shape": {"bias": torch.zeros(3)},
    "weight_c_in": {"weight": torch.randn(8, 2, 3, 3)},
    "x_rank": {"x": torch.randn(3, 6, 6)},
    "stride0": {"stride": [0, 1]},
    "padding_negative": {"padding": [-4, 0]},
    "too_small": {"x": torch.randn(2, 3, 1, 1), "padding": [0, 0]},
}


def _direct_args(**overrides):
    a = _good()
    a.update({"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]})
    a.update(overrides)
    return (
        a["x"],
        a["weight"],
        a["expert_idx"],
        a["gate"],
        a["bias"],
        a["num_experts"],
        a["stride"],
        a["padding"],
        a["dilation"],
    )


@pytest.fixture
def compiled_ops():
    if "cpu" not in moe_kernels.available_backends():
        pytest.skip(f"cpu backend missing: {moe_kernels.unavailable_reason('cpu')}")
    return torch.ops.moe_kernels_C


@pytest.mark.parametrize("name", list(_DIRECT_BAD))
def test_compiled_forward_checks_its_arguments(compiled_ops, name):
    with pytest.raises(RuntimeError, match="sparse_moe_conv2d"):
        compiled_ops.sparse_moe_conv2d_fwd(*_direct_args(**_DIRECT_BAD[name]))


@pytest.mark.parametrize("name", ["idx_too_big", "idx_negative", "gate_shape", "rows", "too_small"])
def test_compiled_backward_checks_its_arguments(compiled_ops, name):
    grad_out = torch.randn(2, 4, 6, 6)
    with pytest.raises(RuntimeError, match="sparse_moe_conv2d"):
        compiled_ops.sparse_moe_conv2d_bwd(grad_out, *_direct_args(**_DIRECT_BAD[name]), [True] * 4)


def test_compiled_backward_checks_grad_out(compiled_ops):
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        compiled_ops.sparse_moe_conv2d_bwd(torch.randn(2, 8, 6, 6), *_direct_args(), [True] * 4)
