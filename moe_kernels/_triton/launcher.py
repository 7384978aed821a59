"""Launchers of the NHWC (v2) kernels: layouts, weight packs, tile tables, configs and grids.

The backend functions in ``moe_kernels.backends.triton`` call these. Everything here stays on the device
(no host synchronisation): the routing slots are sorted with torch ops, the tile table is built with
torch ops for an upper bound of tiles, and the grids are sized from host-known shapes.

Layout: the kernels read x and grad_out as NHWC (channel stride 1). A channels_last input is used as
is (a ``permute`` view); any other input (NCHW, non-contiguous) is copied ONCE per call into
channels_last by ``as_nhwc``. The forward writes the op's usual output layout (channels_last for a
channels_last x, else contiguous NCHW) straight from the epilogue, or the grouped order.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
import triton

from moe_kernels._triton import tuning
from moe_kernels._triton.common import acc_torch_dtype, dot_settings, interpreted
from moe_kernels._triton.packing import packed_weight, padded
from moe_kernels._triton.schedule import build_tile_schedule
from moe_kernels.call import ConvCall
from moe_kernels.geometry import needed_grads, output_memory_format
from moe_kernels.plan import sort_slots

MAX_ROWS = 2**31 - 1
# Cap of the weight-gradient chunks per launch (bounds the fp32 partial buffer to ~chunks x weight size).
MAX_WGRAD_CHUNKS = 256


def _routing(call: ConvCall, rows_per_slot: int, block_rows: int):
    """(sample, slot, tile table) from ``call.plan`` (its cached tables) or, without one, sorted here."""
    if call.plan is not None:
        return call.plan.sample, call.plan.slot, call.plan.tile_schedule(rows_per_slot, block_rows)
    sample, slot, counts = sorted_slots(call.expert_idx, call.num_experts)
    return sample, slot, build_tile_schedule(counts, call.expert_idx.numel(), rows_per_slot, block_rows)


def sorted_slots(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted (sample, slot) of the B*k routing slots and per-expert counts, without a host sync
    (``moe_kernels.plan.sort_slots``, the order of ``RoutingPlan``).

    Returns:
        sample (B*k,) int64, slot (B*k,) int64, counts (E,) int64.
    """
    top_k = expert_idx.shape[1]
    order, counts = sort_slots(expert_idx, num_experts)
    return order // top_k, order % top_k, counts


def as_nhwc(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> a (B, H, W, C) view with channel stride 1; copies once when t is not channels_last."""
    view = t.permute(0, 2, 3, 1)
    if view.shape[3] > 1 and view.stride(3) != 1:
        view = t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return view


def channel_pad_multiple() -> int:
    """Channels of the K axis are zero-padded to a multiple of this (16 compiled; interpreter: configurable).

    With 16, every NHWC row starts 16-element aligned and each K step is a full block: the compiled
    kernels take the unmasked, vectorised ``EVEN_K`` path for any C_in and w (tests/kernels/test_triton_sm90_ptx.py:
    the masked path spills registers on sm_90). ResNet-like channel counts (multiples of 16) need no padding.
    """
    return tuning.INTERPRETER_CONFIG["channel_pad"] if interpreted() else 16


def nhwc_padded(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C_pad) with channel stride 1, zero channels appended (C_pad % multiple == 0).

    No copy for a channels_last t whose C is already a multiple; otherwise one copy.
    """
    c = t.shape[1]
    c_pad = padded(c, multiple)
    if c_pad == c:
        return as_nhwc(t)
    return F.pad(t.permute(0, 2, 3, 1), (0, c_pad - c))


def slots_nhwc_padded(grad_out: torch.Tensor, top_k: int, width: int, multiple: int) -> torch.Tensor:
    """(B, k*w, H, W) -> (B, H, W, k*w_pad): each slot's w channels zero-padded to w_pad (see ``nhwc_padded``)."""
    w_pad = padded(width, multiple)
    if w_pad == width:
        return as_nhwc(grad_out)
    return F.pad(grad_out.permute(0, 2, 3, 1).unflatten(3, (top_k, width)), (0, w_pad - width)).flatten(3)


def fit_block_k(config: tuning.KernelConfig, channels: int) -> tuning.KernelConfig:
    """Halves ``block_k`` (down to 16) until it divides ``channels``, so padded channels give full K steps."""
    block_k = config.block_k
    while block_k > 16 and channels % block_k:
        block_k //= 2
    return config if block_k == config.block_k else dataclasses.replace(config, block_k=block_k)


_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def persistent_programs(work_items: int, config: tuning.KernelConfig, device: torch.device) -> int:
    """Grid of a persistent kernel: SMs x ``programs_per_sm`` (interpreter: a few), at most the work items."""
    if interpreted() or device.type != "cuda":
        return max(1, min(work_items, tuning.INTERPRETER_CONFIG["programs"]))
    return max(1, min(work_items, _sm_count(device) * config.programs_per_sm))


def wgrad_chunk_rows(total_rows: int, block_m: int, col_programs: int, num_experts: int, device: torch.device) -> int:
    """Rows per weight-gradient chunk: enough chunks x ``col_programs`` to give ~4 programs per SM.

    A multiple of ``block_m``; the number of chunks stays below ``MAX_WGRAD_CHUNKS`` (+ E). Under the
    interpreter the rows are cut into ``INTERPRETER_CONFIG["wgrad_chunks"]`` chunks.
    """
    if interpreted() or device.type != "cuda":
        chunks = tuning.INTERPRETER_CONFIG["wgrad_chunks"]
    else:
        chunks = max(1, min(MAX_WGRAD_CHUNKS, 4 * _sm_count(device) // max(col_programs, 1)))
    per = triton.cdiv(max(total_rows, 1), chunks)
    return triton.cdiv(per, block_m) * block_m


_warned: set[str] = set()


def unsupported_reason(x: torch.Tensor, num_slots: int, rows_per_slot: int) -> str | None:
    """Why the Triton kernels cannot run this call (the backend then falls back), or None."""
    if x.device.type == "cuda" and x.dtype not in tuning.SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported by the compiled Triton kernels (fp16, bf16, fp32)"
    if num_slots * rows_per_slot > MAX_ROWS:
        return f"B*k*pixels = {num_slots * rows_per_slot} exceeds the kernels' 2**31 - 1 GEMM rows"
    return None


def warn_fallback_once(reason: str) -> None:
    """One warning per distinct reason that a call fell back to the reference backend."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"sparse_moe_conv2d backend 'triton': {reason}; using the reference backend", stacklevel=4)


def conv_forward(
    call: ConvCall, residual: torch.Tensor | None = None, relu: bool = False, grouped_out: bool = False
) -> torch.Tensor:
    """Forward v2 with the fused epilogue ``relu?(gate * (conv + bias) + residual)``.

    Args:
        call: the op call; x (B, C_in, H, W) any layout (channels_last avoids the one copy); ``call.plan`` a
            ``RoutingPlan`` of expert_idx (its sorted slots and cached tile tables), or None.
        residual: None or a tensor of the output's shape (scattered: (B, k*w, H_out, W_out), any strides;
            grouped: (B*k*H_out*W_out, w)), added after the gate and before the ReLU.
        relu: fuse a ReLU.
        grouped_out: return the grouped order (B*k*H_out*W_out, w): row ``s*H_out*W_out + p`` is pixel p of
            the s-th routing slot in expert-sorted order (``sorted_slots``), instead of the scattered layout.

    Returns:
        (B, k*w, H_out, W_out) in x's dtype and memory format, or the grouped (B*k*H_out*W_out, w).
    """
    x, weight = call.x, call.weight
    batch, top_k, width = call.batch, call.top_k, call.width
    kh, kw = weight.shape[2:]
    h_out, w_out = call.out_hw
    rows_per_slot = h_out * w_out
    if grouped_out:
        y = torch.empty(batch * top_k * rows_per_slot, width, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty(
            batch, top_k * width, h_out, w_out, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x)
        )
    if y.numel() == 0:
        return y
    config = tuning.get_config("fwd", x.dtype, x.shape[1], width, (kh, kw), call.stride, x.device)
    pad = channel_pad_multiple()
    x_nhwc = nhwc_padded(x, pad)
    config = fit_block_k(config, x_nhwc.shape[3])
    sample, slot, schedule = _routing(call, rows_per_slot, config.block_m)
    work = schedule.num_tiles * triton.cdiv(width, config.block_n)
    from moe_kernels._triton.forward_nhwc import launch_forward_nhwc

    launch_forward_nhwc(
        x_nhwc,
        packed_weight(weight, call.num_experts, "fwd", pad, config.block_n),
        call.bias,
        call.gate,
        residual,
        y,
        (sample, slot),
        schedule,
        width,
        call.stride,
        call.padding,
        call.dilation,
        (kh, kw),
        relu,
        grouped_out,
        dot_settings(x.dtype),
        config,
        persistent_programs(work, config, x.device),
    )
    return y


def conv_backward(
    grad_out: torch.Tensor, call: ConvCall, needs: tuple[bool, bool, bool, bool]
) -> tuple[torch.Tensor | None, ...]:
    """Backward v2: (grad_x, grad_weight, grad_bias, grad_gate), None where not needed.

    grad_x comes back channels_last (the kernels' layout; the op makes it contiguous); the weight, bias
    and gate gradients are deterministic (no atomics).
    """
    from moe_kernels._triton.dgrad_nhwc import launch_dgrad_nhwc
    from moe_kernels._triton.wgrad_reduce import launch_wgrad_nhwc

    need_x, need_w, need_b, need_g = needed_grads(needs, call.bias, call.gate)
    x, weight, gate, bias, num_experts = call.x, call.weight, call.gate, call.bias, call.num_experts
    stride, padding, dilation = call.stride, call.padding, call.dilation
    batch, top_k, width = call.batch, call.top_k, call.width
    if batch * top_k == 0 or grad_out.numel() == 0 or x.numel() == 0:
        return call.zero_grads(needs)
    rows, c_in, kh, kw = weight.shape
    _, _, height, wid = x.shape
    acc_dtype = acc_torch_dtype(x.dtype)
    dot = dot_settings(x.dtype)
    grad_x = grad_w = grad_b = grad_g = None
    pad = channel_pad_multiple()
    x_nhwc = nhwc_padded(x, pad)  # (B, H, W, C_pad)
    go_nhwc = slots_nhwc_padded(grad_out.to(x.dtype), top_k, width, pad)  # (B, H_out, W_out, k*w_pad)
    w_pad = padded(width, pad)
    num_slots = batch * top_k
    if need_x or need_g:
        config = fit_block_k(tuning.get_config("dgrad", x.dtype, c_in, width, (kh, kw), stride, x.device), w_pad)
        sample, slot, schedule = _routing(call, height * wid, config.block_m)
        n_blocks = triton.cdiv(c_in, config.block_n)
        target = None
        if need_x:
            if top_k == 1:  # every input pixel belongs to one slot: written directly
                target = torch.empty(batch, height, wid, c_in, dtype=x.dtype, device=x.device)
            else:
                target = torch.empty(batch, top_k, height, wid, c_in, dtype=acc_dtype, device=x.device)
        gate_part = None
        if need_g:
            gate_part = torch.empty(n_blocks, num_slots * height * wid, dtype=acc_dtype, device=x.device)
        launch_dgrad_nhwc(
            go_nhwc,
            packed_weight(weight, num_experts, "dgrad", pad, config.block_n),
            x_nhwc,
            c_in,
            gate,
            target,
            gate_part,
            (sample, slot),
            schedule,
            w_pad,
            stride,
            padding,
            dilation,
            (kh, kw),
            dot,
            config,
            persistent_programs(schedule.num_tiles * n_blocks, config, x.device),
        )
        if need_x:
            nhwc = target if top_k == 1 else target.sum(1).to(x.dtype)
            grad_x = nhwc.permute(0, 3, 1, 2)
        if need_g:
            per_sorted_slot = gate_part.sum(0).view(num_slots, height * wid).sum(1)
            grad_g = torch.empty(num_slots, dtype=acc_dtype, device=x.device)
            grad_g.index_copy_(0, sample * top_k + slot, per_sorted_slot)  # unique indices: deterministic
    if need_w or need_b:
        config = tuning.get_config("wgrad", x.dtype, c_in, width, (kh, kw), stride, x.device)
        config = fit_block_k(config, x_nhwc.shape[3])
        rows_per_slot = go_nhwc.shape[1] * go_nhwc.shape[2]
        col_programs = triton.cdiv(w_pad, config.block_n) * kh * kw * triton.cdiv(x_nhwc.shape[3], config.block_k)
        chunk = wgrad_chunk_rows(num_slots * rows_per_slot, config.block_m, col_programs, num_experts, x.device)
        sample, slot, schedule = _routing(call, rows_per_slot, chunk)
        gw5, grad_b = launch_wgrad_nhwc(
            go_nhwc,
            x_nhwc,
            gate,
            need_w,
            need_b,
            (sample, slot),
            schedule,
            num_experts,
            w_pad,
            stride,
            padding,
            dilation,
            (kh, kw),
            acc_dtype,
            weight.dtype if need_w else bias.dtype,
            dot,
            config,
        )
        if need_w:  # (E, w_pad, kh, kw, C_pad) -> (E*w, C_in, kh, kw)
            grad_w = gw5[:, :width, :, :, :c_in].permute(0, 1, 4, 2, 3).reshape(rows, c_in, kh, kw)
        if need_b:
            grad_b = grad_b.view(num_experts, w_pad)[:, :width].reshape(-1).to(bias.dtype)
    if need_g:
        if bias is not None:  # <g, bias> term: sum over the slot's channels of bias * spatial sum of g
            gsum = grad_out.to(acc_dtype).sum((2, 3)).reshape(batch, top_k, width)
            bias_sel = bias.to(acc_dtype).reshape(num_experts, width)[call.expert_idx]  # (B, k, w)
            grad_g = grad_g + (gsum * bias_sel).sum(2).reshape(-1)
        grad_g = grad_g.reshape(batch, top_k).to(gate.dtype)
    return grad_x, grad_w, grad_b, grad_g
