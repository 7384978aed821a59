"""Weights packed once per expert into the GEMM layouts of the NHWC kernels, with a cache.

Two packs of ``weight`` (E*w, C_in, kh, kw):

* ``"fwd"``: (E, kh*kw*C_pad, w_cols) -- ``pack[e, (ki*kw + kj)*C_pad + c, n] = weight[e*w + n, c, ki, kj]``.
  The forward's K axis is ordered (tap, channel), so a K block is BLOCK_K contiguous channels of one
  tap, and its weight rows are contiguous too (N contiguous inside a row).
* ``"dgrad"``: (E, kh*kw*w_pad, C_cols) -- ``pack[e, (ki*kw + kj)*w_pad + n, c] = weight[e*w + n, c, ki, kj]``,
  the transposed pack of the input gradient (K ordered (tap, output channel), C_in contiguous).

The K channels are zero-padded (C_pad, w_pad: multiples of ``pad_to``) to match the launcher's
zero-padded activations, so every K step is a full, aligned block; the columns are zero-padded
(w_cols, C_cols: multiples of ``cols_to``, the kernel's BLOCK_N) so weight loads need no mask.

Cache: one entry per live weight tensor (keyed by ``id`` and checked with a weak reference, so it
never keeps a weight alive and an entry dies with its tensor). An entry is reused only while the
tensor's ``data_ptr``, ``_version`` (bumped by every in-place update, e.g. an optimizer step), shape,
strides and dtype are unchanged; anything else repacks. Tensors without a version counter (inference
tensors) are packed on every call and never cached. ``clear_pack_cache()`` empties the cache.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

_CACHE: dict[int, tuple[weakref.ref, tuple, dict[str, torch.Tensor]]] = {}


def _fingerprint(weight: torch.Tensor) -> tuple | None:
    try:
        version = weight._version
    except RuntimeError:  # inference tensors track no version
        return None
    return (weight.data_ptr(), version, tuple(weight.shape), weight.stride(), weight.dtype, weight.device)


def _pack(weight: torch.Tensor, num_experts: int, kind: str, pad_to: int, cols_to: int) -> torch.Tensor:
    rows, c_in, kh, kw = weight.shape
    width = rows // num_experts
    w5 = weight.detach().reshape(num_experts, width, c_in, kh, kw)
    if kind == "fwd":  # (E, kh, kw, C_pad, w)
        c_pad, cols = padded(c_in, pad_to), padded(width, cols_to)
        packed = F.pad(w5.permute(0, 3, 4, 2, 1), (0, cols - width, 0, c_pad - c_in))
        return packed.reshape(num_experts, kh * kw * c_pad, cols).contiguous()
    if kind == "dgrad":  # (E, kh, kw, w_pad, C_in)
        w_pad, cols = padded(width, pad_to), padded(c_in, cols_to)
        packed = F.pad(w5.permute(0, 3, 4, 1, 2), (0, cols - c_in, 0, w_pad - width))
        return packed.reshape(num_experts, kh * kw * w_pad, cols).contiguous()
    raise ValueError(f"kind must be 'fwd' or 'dgrad', got {kind!r}")


def padded(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``."""
    return -(-size // multiple) * multiple


def packed_weight(weight: torch.Tensor, num_experts: int, kind: str, pad_to: int = 1, cols_to: int = 1) -> torch.Tensor:
    """The ``kind`` pack ("fwd" or "dgrad", see the module docstring) of ``weight``, cached.

    Args:
        weight: (E*w, C_in, kh, kw).
        num_experts: E.
        kind: "fwd" -> (E, kh*kw*C_pad, w_cols); "dgrad" -> (E, kh*kw*w_pad, C_cols).
        pad_to: the K channels (C_in for "fwd", w for "dgrad") are zero-padded to a multiple of this
            (matching the zero-padded NHWC activations of the launcher).
        cols_to: the columns (w for "fwd", C_in for "dgrad") are zero-padded to a multiple of this (the
            kernel's BLOCK_N), so the kernels load weight blocks without a mask.
    """
    fingerprint = _fingerprint(weight)
    if fingerprint is None:
        return _pack(weight, num_experts, kind, pad_to, cols_to)
    key = id(weight)
    entry = _CACHE.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != fingerprint:
        entry = (weakref.ref(weight, lambda _ref, key=key: _CACHE.pop(key, None)), fingerprint, {})
        _CACHE[key] = entry
    packs = entry[2]
    pack_key = f"{kind}/{num_experts}/{pad_to}/{cols_to}"
    if pack_key not in packs:
        packs[pack_key] = _pack(weight, num_experts, kind, pad_to, cols_to)
    return packs[pack_key]


def clear_pack_cache() -> None:
    """Drops every cached pack."""
    _CACHE.clear()


def pack_cache_size() -> int:
    """Number of weight tensors with cached packs (for tests and diagnostics)."""
    return len(_CACHE)
