"""Convolution geometry shared by the op, its fake kernel and every backend: output size, output memory
format, the row gather that keeps that format, and the gradients a backward call must produce."""

from __future__ import annotations

import torch

Pair = tuple[int, int]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one spatial axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def output_hw(x: torch.Tensor, weight: torch.Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    """(H_out, W_out) of the op for x (B, C_in, H, W) and weight (E*w, C_in, kh, kw)."""
    return (
        conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0]),
        conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1]),
    )


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The op's output follows its input: channels_last when x is channels_last (and not also plain
    contiguous, as with one channel or 1x1 images), else contiguous."""
    channels_last = x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last and not x.is_contiguous() else torch.contiguous_format


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` in x's memory format: (B, C, H, W) -> (len(index), C, H, W).

    ``index_select`` returns a plain contiguous tensor, so a channels_last batch would come back NCHW and the
    next convolution would convert it back (two copies of the batch); gathering the (B, H, W, C) view keeps
    channels_last in one copy.
    """
    if output_memory_format(x) is torch.channels_last:
        return x.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
    return x.index_select(0, index)


def needed_grads(
    needs: tuple[bool, bool, bool, bool], bias: torch.Tensor | None, gate: torch.Tensor | None
) -> tuple[bool, bool, bool, bool]:
    """``needs`` for (x, weight, bias, gate) as plain bools, with bias/gate dropped when they are None."""
    need_x, need_w, need_b, need_g = (bool(n) for n in needs)
    return need_x, need_w, need_b and bias is not None, need_g and gate is not None
