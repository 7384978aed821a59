"""The NHWC (v2) Triton kernels against the reference, under the interpreter (fp64, tiny blocks).

Covers the forward with every fused-epilogue combination (bias, gate, residual, ReLU; scattered and
grouped stores), the input/gate gradients and the deterministic weight/bias gradients, on odd shapes:
channel counts that are not multiples of the block (padded and unpadded/masked), odd widths,
stride/padding/dilation, an empty expert, k = 1 and k = E, B = 1, NCHW and channels_last; plus the
weight-pack cache, the launch-config table lookup and the auto choice.
"""

import dataclasses
import json

import pytest
import torch
from helpers.op_cases import CASES, GRAD_SUBSETS, SINGLE_GRADS, Case, assert_close, make_inputs

from moe_kernels.call import ConvCall
from moe_kernels.reference import sparse_moe_conv2d_backward_ref, sparse_moe_conv2d_ref

launcher = pytest.importorskip("moe_kernels._triton.launcher")
from moe_kernels._triton import common, packing, tuning  # noqa: E402

ALL = (True, True, True, True)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch, request):
    """32-row tiles, 3 persistent programs (each walks several tiles), 3 weight-gradient chunks.

    CPU-tensor tests need the interpreter; on a GPU machine (no TRITON_INTERPRET) only the ``cuda`` ones run.
    """
    if not common.interpreted() and "cuda" not in request.keywords:
        pytest.skip("runs its kernels in the Triton interpreter (TRITON_INTERPRET=1)")
    cfg = {"block_m": 32, "block_n": 16, "block_k": 16, "programs": 3, "wgrad_chunks": 3, "channel_pad": 16}
    monkeypatch.setattr(tuning, "INTERPRETER_CONFIG", cfg)
    return cfg


@pytest.fixture
def tiny_blocks(small_blocks):
    """16-row tiles and 5 chunks: tiles that span slots, slots that span tiles, several K steps."""
    small_blocks.update(block_m=16, wgrad_chunks=5)
    return small_blocks


def _detached(case, dtype=torch.float64):
    return [t.detach() if t is not None else None for t in make_inputs(case, dtype)]


def _check(case: Case, expert_idx=None, needs=ALL, tol=1e-10):
    x, weight, idx, gate, bias = _detached(case)
    idx = idx if expert_idx is None else expert_idx
    args = (x, weight, idx, case.experts, gate, bias, case.stride, case.padding, case.dilation)
    out = launcher.conv_forward(ConvCall(*args))
    expected = sparse_moe_conv2d_ref(*args)
    assert_close(out, expected, tol, tol, "forward")
    if case.channels_last and case.c_in > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=expected.dtype)
    got = launcher.conv_backward(grad_out, ConvCall(*args), needs)
    want = sparse_moe_conv2d_backward_ref(grad_out, *args, needs)
    for name, g, w in zip(("x", "weight", "bias", "gate"), got, want, strict=True):
        if w is None:
            assert g is None, f"grad {name}: expected None"
            continue
        assert_close(g, w, tol * 10, tol * 10, f"grad {name}")


SMALL = {"size": (4, 5), "batch": 2}
SHAPES = {
    "even_channels": Case(c_in=16, width=16, experts=2, **SMALL),
    "stride_pad_dilation": Case(stride=(2, 3), dilation=(2, 2), padding=(1, 2), size=(8, 9), kernel=(3, 2), batch=2),
    "kernel5_pad0_k2of4": Case(kernel=(5, 5), padding=(0, 0), size=(5, 6), top_k=2, experts=4, batch=2),
    "conv1x1_stride2": Case(kernel=(1, 1), padding=(0, 0), stride=(2, 2), size=(7, 6)),
    "empty_expert": dataclasses.replace(CASES["empty_expert"], size=(4, 5)),
    "k_equals_e": dataclasses.replace(CASES["k_equals_e"], **SMALL),
    "batch1": dataclasses.replace(CASES["batch1"], size=(4, 5)),
    "channels_last": Case(channels_last=True, c_in=18, width=5, **SMALL),
    "non_contiguous": dataclasses.replace(CASES["non_contiguous"], **SMALL),
    "no_bias_no_gate": dataclasses.replace(CASES["no_bias_no_gate"], **SMALL),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_backward_match_reference(name):
    _check(SHAPES[name])


def test_many_tiles_k_steps_and_column_blocks(tiny_blocks):
    # C_in 17 -> padded 32 (2 K steps per tap), w 19 (2 column blocks), 16-row tiles over 12-pixel slots.
    _check(Case(batch=2, c_in=17, width=19, experts=3, top_k=2, size=(3, 4)))


def test_forward_with_tma_weight_loads(small_blocks):
    small_blocks["tma"] = True  # the weight blocks come through a host-side tensor descriptor
    case = Case(batch=2, c_in=17, width=19, experts=2, top_k=2, size=(3, 4), channels_last=True)
    x, weight, idx, gate, bias = _detached(case)
    args = (x, weight, idx, case.experts, gate, bias, case.stride, case.padding, case.dilation)
    assert_close(launcher.conv_forward(ConvCall(*args)), sparse_moe_conv2d_ref(*args), 1e-10, 1e-10, "forward (TMA)")


def test_unpadded_masked_path(small_blocks):
    # channel_pad 1: C_in = 17 and w = 19 are not multiples of BLOCK_K = 16, so the masked K path runs.
    small_blocks["channel_pad"] = 1
    _check(Case(batch=2, c_in=17, width=19, experts=2, top_k=2, size=(3, 4)))


def test_all_slots_on_one_expert():
    case = Case(batch=5, experts=4, width=5, size=(4, 5))
    _check(case, expert_idx=torch.full((5, 1), 2, dtype=torch.int64))


@pytest.mark.parametrize("needs", [GRAD_SUBSETS[k] for k in SINGLE_GRADS], ids=SINGLE_GRADS)
def test_gradient_subsets(needs):
    _check(Case(top_k=2, experts=3, batch=2, size=(3, 4)), needs=needs)


def _grouped(ref: torch.Tensor, idx: torch.Tensor, experts: int, width: int) -> torch.Tensor:
    """(B, k*w, H, W) -> (B*k*H*W, w) rows in the kernels' expert-sorted slot order."""
    sample, slot, _ = launcher.sorted_slots(idx, experts)
    batch, top_k = idx.shape
    per_slot = ref.reshape(batch, top_k, width, *ref.shape[2:])[sample, slot]  # (B*k, w, H, W)
    return per_slot.permute(0, 2, 3, 1).reshape(-1, width)


@pytest.mark.parametrize("grouped", [False, True], ids=["scattered", "grouped"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_epilogue(grouped, residual, relu, channels_last):
    case = Case(batch=3, c_in=6, width=5, experts=3, top_k=2, size=(4, 5), channels_last=channels_last)
    x, weight, idx, gate, bias = _detached(case)
    args = (x, weight, idx, case.experts, gate, bias, case.stride, case.padding, case.dilation)
    ref = sparse_moe_conv2d_ref(*args)
    res = None
    if residual:
        res = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=ref.dtype)
        res = res.contiguous(memory_format=torch.channels_last) if channels_last else res
        ref = ref + res
    if relu:
        ref = torch.relu(ref)
    if grouped:
        ref = _grouped(ref, idx, case.experts, case.width)
        res = _grouped(res, idx, case.experts, case.width) if res is not None else None
    out = launcher.conv_forward(ConvCall(*args), residual=res, relu=relu, grouped_out=grouped)
    assert_close(out, ref, 1e-10, 1e-10, "fused forward")


def test_weight_gradients_are_deterministic():
    case = Case(batch=4, c_in=5, width=3, experts=2, top_k=2, size=(4, 4))
    x, weight, idx, gate, bias = _detached(case, torch.float32)
    args = (x, weight, idx, case.experts, gate, bias, case.stride, case.padding, case.dilation)
    grad_out = torch.randn(4, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    first = launcher.conv_backward(grad_out, ConvCall(*args), ALL)
    second = launcher.conv_backward(grad_out, ConvCall(*args), ALL)
    for name, a, b in zip(("x", "weight", "bias", "gate"), first, second, strict=True):
        assert torch.equal(a, b), f"grad {name} differs between two runs"


def test_low_precision_within_twice_plain_pytorch():
    """bf16 plumbing (padded NHWC copies, fp32 partials, casts): error <= 2x plain PyTorch's in bf16.

    The interpreter TRUNCATES fp32 -> bf16 casts (a GPU rounds to nearest), so one bf16 ulp of the
    largest value is allowed on top of the rule.
    """
    case = Case(top_k=2, experts=3, batch=3, c_in=6, width=5, size=(4, 5))
    high, low = _detached(case, torch.float32), _detached(case, torch.bfloat16)
    extra = (case.stride, case.padding, case.dilation)
    want = sparse_moe_conv2d_ref(*high[:3], case.experts, *high[3:], *extra)
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    want_grads = sparse_moe_conv2d_backward_ref(grad_out, *high[:3], case.experts, *high[3:], *extra, ALL)
    low_args = (*low[:3], case.experts, *low[3:], *extra)
    got = (
        launcher.conv_forward(ConvCall(*low_args)),
        *launcher.conv_backward(grad_out.bfloat16(), ConvCall(*low_args), ALL),
    )
    base = (sparse_moe_conv2d_ref(*low_args), *sparse_moe_conv2d_backward_ref(grad_out.bfloat16(), *low_args, ALL))
    for what, g, b, w in zip(("forward", "x", "weight", "bias", "gate"), got, base, (want, *want_grads), strict=True):
        assert g.dtype == torch.bfloat16, what
        err = (g.float() - w).abs().max().item()
        base_err = (b.float() - w).abs().max().item()
        ulp = 2.0 ** (torch.floor(torch.log2(w.abs().max())).item() - 7)
        assert err <= 2 * base_err + ulp, f"{what}: max err {err:.3e} vs plain PyTorch {base_err:.3e} (ulp {ulp:.1e})"


def test_unsupported_call_falls_back_to_the_reference_with_one_warning(monkeypatch):
    from moe_kernels.backends import triton as triton_conv

    monkeypatch.setattr(launcher, "unsupported_reason", lambda *a: "dtype test-only is not supported")
    monkeypatch.setattr(launcher, "_warned", set())
    case = Case(batch=2, size=(4, 5))
    x, weight, idx, gate, bias = _detached(case)
    args = (x, weight, idx, case.experts, gate, bias, case.stride, case.padding, case.dilation)
    with pytest.warns(UserWarning, match="dtype test-only is not supported.*reference backend"):
        out = triton_conv.forward(ConvCall(*args))
    assert_close(out, sparse_moe_conv2d_ref(*args), 1e-12, 1e-12, "fallback forward")
    grad_out = torch.ones_like(out)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason warns only once
        got = triton_conv.backward(grad_out, ConvCall(*args), ALL)
    want = sparse_moe_conv2d_backward_ref(grad_out, *args, ALL)
    for name, g, w in zip(("x", "weight", "bias", "gate"), got, want, strict=True):
        assert_close(g, w, 1e-12, 1e-12, f"fallback grad {name}")


# ---------------------------------------------------------------- weight packs


def test_pack_layouts_and_padding():
    weight = torch.randn(2 * 3, 5, 3, 2, dtype=torch.float64)
    fwd = packing.packed_weight(weight, 2, "fwd", pad_to=8, cols_to=4)  # (E, kh*kw*C_pad, w_cols)
    assert fwd.shape == (2, 3 * 2 * 8, 4)
    w5 = weight.reshape(2, 3, 5, 3, 2)
    e, n, c, ki, kj = 1, 2, 4, 2, 1
    assert fwd[e, (ki * 2 + kj) * 8 + c, n] == w5[e, n, c, ki, kj]
    assert not fwd[:, :, 3:].any() and not fwd.reshape(2, 6, 8, 4)[:, :, 5:].any()
    dgrad = packing.packed_weight(weight, 2, "dgrad", pad_to=8, cols_to=16)  # (E, kh*kw*w_pad, C_cols)
    assert dgrad.shape == (2, 6 * 8, 16)
    assert dgrad[e, (ki * 2 + kj) * 8 + n, c] == w5[e, n, c, ki, kj]


def test_pack_cache_reuses_and_invalidates():
    packing.clear_pack_cache()
    weight = torch.randn(4, 3, 3, 3)
    first = packing.packed_weight(weight, 2, "fwd")
    assert packing.packed_weight(weight, 2, "fwd") is first  # cached
    with torch.no_grad():
        weight.add_(1.0)  # bumps the version counter: the pack must follow
    second = packing.packed_weight(weight, 2, "fwd")
    assert second is not first
    assert torch.equal(second, packing._pack(weight, 2, "fwd", 1, 1))
    del weight, first, second
    assert packing.pack_cache_size() == 0  # the entry died with its tensor


def test_inference_tensors_are_packed_but_not_cached():
    packing.clear_pack_cache()
    with torch.inference_mode():
        weight = torch.randn(4, 3, 3, 3)
        packed = packing.packed_weight(weight, 2, "fwd")
    assert packed.shape == (2, 27, 2) and packing.pack_cache_size() == 0


# ---------------------------------------------------------------- configs and auto choice


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Pretends to be a compiled (non-interpreted) run on a GPU called "NVIDIA Test GPU"."""
    monkeypatch.setattr(common, "interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Test GPU")
    monkeypatch.setenv("ADVMOE_TRITON_TUNED_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_warned", set())
    tuning._load_table.cache_clear()
    yield tmp_path
    tuning._load_table.cache_clear()


CUDA = torch.device("cuda", 0)


def test_unknown_gpu_gets_the_default_and_says_so(fake_gpu):
    with pytest.warns(UserWarning, match="no tuned table for 'NVIDIA Test GPU'"):
        cfg = tuning.get_config("fwd", torch.bfloat16, 64, 64, (3, 3), (1, 1), CUDA)
    assert cfg == tuning.default_config("fwd", torch.bfloat16, 64)
    assert "no tuned table" in tuning.config_reason("fwd", torch.bfloat16, 64, 64, (3, 3), (1, 1))
    backend, reason = tuning.choose_backend(torch.bfloat16, 64, 64, (3, 3), (1, 1), CUDA)
    assert backend == "cuda" and "no tuned table" in reason


def test_tuned_table_lookup_and_auto_choice(fake_gpu):
    cls = tuning.shape_class(64, 64, (3, 3), (1, 1))
    table = {
        "gpu": "NVIDIA Test GPU",
        "configs": {f"fwd|bf16|{cls}": {"block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": 4}},
        "auto": {
            f"bf16|{cls}": {"backend": "triton", "triton_us": 10.0, "cudnn_us": 12.5},
            f"fp32|{cls}": {"backend": "cudnn", "triton_us": 30.0, "cudnn_us": 20.0},
        },
    }
    (fake_gpu / "nvidia-test-gpu.json").write_text(json.dumps(table))
    assert tuning.get_config("fwd", torch.bfloat16, 60, 64, (3, 3), (1, 1), CUDA) == tuning.KernelConfig(
        64, 64, 32, 4, 4
    )
    # a shape class the table does not list: the default, never an error
    assert tuning.get_config("fwd", torch.bfloat16, 300, 64, (3, 3), (1, 1), CUDA).block_k == 64
    assert "not in the table" in tuning.config_reason("fwd", torch.bfloat16, 300, 64, (3, 3), (1, 1))
    backend, reason = tuning.choose_backend(torch.bfloat16, 64, 64, (3, 3), (1, 1), CUDA)
    assert backend == "triton" and "10.0 us" in reason
    assert tuning.choose_backend(torch.float32, 64, 64, (3, 3), (1, 1), CUDA)[0] == "cuda"
    assert tuning.choose_backend(torch.float32, 64, 64, (3, 3), (1, 1), CUDA, ("triton", "reference"))[0] == "reference"
    backend, reason = tuning.choose_backend(torch.float64, 64, 64, (3, 3), (1, 1), CUDA)
    assert backend == "cuda" and "not supported" in reason


def test_auto_backend_on_cpu_names_the_order():
    from moe_kernels.backends import AUTO_ORDER, auto_backend

    x, weight = torch.randn(1, 3, 4, 4), torch.randn(4, 3, 3, 3)
    backend, reason = auto_backend(x, weight, 2)
    assert backend in AUTO_ORDER["cpu"] and "cpu order" in reason


def test_candidates_start_with_the_default_and_are_distinct():
    for kind in tuning.KINDS:
        for dtype in (torch.bfloat16, torch.float32):
            cands = tuning.candidate_configs(kind, dtype, 64)
            assert cands[0] == tuning.default_config(kind, dtype, 64)
            assert len(set(cands)) == len(cands) >= 3


# ---------------------------------------------------------------- GPU only (unmeasured in this repository so far)


def _gpu_inputs(dtype, c_in=35, width=40, batch=32, size=(15, 17), top_k=2, experts=4, channels_last=True):
    case = Case(
        batch=batch, c_in=c_in, width=width, experts=experts, top_k=top_k, size=size, channels_last=channels_last
    )
    return case, [t.detach() if t is not None else None for t in make_inputs(case, dtype, device="cuda")]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "shape", [dict(c_in=64, width=64, size=(32, 32), top_k=1, experts=2), dict()], ids=["c64w64", "odd"]
)
def test_gpu_fused_epilogue_error_rule(dtype, shape, monkeypatch):
    """relu(gate * (conv + bias) + residual): error vs fp64 <= 2x plain PyTorch's in the same dtype."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    case, low = _gpu_inputs(dtype, **shape)
    _, high = _gpu_inputs(torch.float64, **shape)
    extra = (case.stride, case.padding, case.dilation)
    want = sparse_moe_conv2d_ref(*high[:3], case.experts, *high[3:], *extra)
    residual = torch.randn(want.shape, device="cuda", dtype=torch.float64)
    want = torch.relu(want + residual)
    got = launcher.conv_forward(
        ConvCall(*low[:3], case.experts, *low[3:], *extra), residual=residual.to(dtype), relu=True
    )
    base = torch.relu(sparse_moe_conv2d_ref(*low[:3], case.experts, *low[3:], *extra) + residual.to(dtype))
    err, base_err = (got.double() - want).abs().max().item(), (base.double() - want).abs().max().item()
    assert err <= 2 * base_err + 1e-5 * want.abs().max().item(), f"max err {err:.3e} vs plain PyTorch {base_err:.3e}"


@pytest.mark.cuda
def test_gpu_weight_gradients_bitwise_deterministic():
    case, (x, weight, idx, gate, bias) = _gpu_inputs(
        torch.bfloat16, c_in=64, width=64, batch=64, size=(32, 32), top_k=1, experts=2
    )
    args = (x, weight, idx, case.experts, gate, bias, case.stride, case.padding, case.dilation)
    grad_out = torch.randn(64, 64, 32, 32, device="cuda", dtype=torch.bfloat16)
    first = launcher.conv_backward(grad_out, ConvCall(*args), ALL)
    second = launcher.conv_backward(grad_out, ConvCall(*args), ALL)
    for name, a, b in zip(("x", "weight", "bias", "gate"), first, second, strict=True):
        assert torch.equal(a, b), f"grad {name} differs between two runs"


@pytest.mark.cuda
def test_gpu_fused_forward_and_backward_never_sync():
    case, (x, weight, idx, gate, bias) = _gpu_inputs(torch.bfloat16)
    args = (x, weight, idx, case.experts, gate, bias, case.stride, case.padding, case.dilation)
    out = launcher.conv_forward(ConvCall(*args), relu=True, grouped_out=True)  # compile outside the checked region
    grad_out = torch.ones(32, 80, 15, 17, device="cuda", dtype=torch.bfloat16)
    launcher.conv_backward(grad_out, ConvCall(*args), ALL)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = launcher.conv_forward(ConvCall(*args), relu=True, grouped_out=True)
        launcher.conv_backward(grad_out, ConvCall(*args), ALL)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (32 * 2 * 15 * 17, 40)
