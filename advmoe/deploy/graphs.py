"""CUDA-graph capture of an inference model for one input shape and dtype: ``capture`` / ``CapturedModel``.

The model's forward is recorded once into a ``torch.cuda.CUDAGraph`` reading a static input buffer and
writing a static output buffer; each call copies the input in, replays the graph (one launch for the whole
network) and returns a copy of the output. An input of another shape, dtype, device or memory layout is
refused with a ``ValueError`` naming what differs: the graph would otherwise read stale buffers.

What can be captured: dense models; ``PathwayMoE``, ``GroupedMoE`` and per-layer-router models
(``RoutedExpertConv2d``): while capturing they run every pathway / expert on the whole batch and select per
sample, because their grouped schedule reads the per-expert counts on the host (E times the MoE compute;
unmeasured on a GPU so far); layer-mode models only if their op backend is sync-free.
"""

from __future__ import annotations

import torch
from torch import nn


def check_static_input(x: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Raises ``ValueError`` naming the difference if x does not match a captured graph's input buffer.

    Args:
        x: the call's input.
        shape, dtype, device: those of the captured input buffer.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"input must be a tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"input shape {tuple(x.shape)} differs from the captured shape {tuple(shape)}; capture another "
            "CapturedModel for this batch size (a CUDA graph replays fixed shapes)"
        )
    if x.dtype != dtype:
        raise ValueError(f"input dtype {x.dtype} differs from the captured dtype {dtype}")
    if x.device != device:
        raise ValueError(f"input device {x.device} differs from the captured device {device}")


class CapturedModel(nn.Module):
    """An inference model replayed from a CUDA graph for a fixed input shape and dtype.

    Args:
        model: an eval-mode model on a CUDA device (e.g. ``to_sparse(...)`` or a folded dense model).
        example: (B, C, H, W) CUDA input fixing the shape, dtype and memory format of every later call.
        warmup: eager calls on a side stream before capture (cuDNN autotuning, lazy initialisation).
        clone_output: return a copy of the static output (default); False returns the static buffer itself,
            which the next call overwrites.

    Raises:
        ValueError: model or example not on CUDA (capture needs a GPU).
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, warmup: int = 3, clone_output: bool = True):
        super().__init__()
        if not isinstance(example, torch.Tensor) or example.dim() < 1:
            raise ValueError(f"example must be a batched tensor, got {getattr(example, 'shape', type(example))}")
        self.model = model.eval()
        self.shape, self.dtype, self.device = tuple(example.shape), example.dtype, example.device
        self.clone_output = clone_output
        self.static_input = example.detach().clone()
        self.graph = None
        self.static_output = self._capture(warmup)

    def _capture(self, warmup: int) -> torch.Tensor:
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(
                f"CapturedModel needs a CUDA model and input (a CUDA graph), got an input on {self.device}; "
                "on CPU use the deployed model directly"
            )
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(warmup):
                self.model(self.static_input)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            out = self.model(self.static_input)
        return out

    def _replay(self) -> None:
        self.graph.replay()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for x, which must match the captured input's shape, dtype and device."""
        check_static_input(x, self.shape, self.dtype, self.device)
        self.static_input.copy_(x)
        self._replay()
        return self.static_output.clone() if self.clone_output else self.static_output


def capture(
    model: nn.Module,
    batch_size: int,
    dtype: torch.dtype | None = None,
    image_size: int | None = None,
    channels_last: bool = True,
    warmup: int = 3,
) -> CapturedModel:
    """Captures a CUDA model for inputs (batch_size, C, H, W), random example images, dtype of the model.

    Args:
        model: a CUDA inference model (converted to ``dtype`` and, if asked, channels_last, in place).
        batch_size: B of every later call.
        dtype: input and model dtype (default: the model's).
        image_size: H = W (default ``model.config``'s: 32, or 224 for ImageNet models).
        channels_last: use the channels_last memory format (the input must then be channels_last too).
        warmup: eager calls before capture.

    Returns:
        The ``CapturedModel``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    param = next(model.parameters())
    dtype = dtype or param.dtype
    cfg = getattr(model, "config", {}) or {}
    size = image_size or (224 if "imagenet" in str(cfg.get("name", "")) else 32)
    model.to(dtype=dtype)
    x = torch.rand(batch_size, cfg.get("in_channels", 3), size, size, device=param.device, dtype=dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return CapturedModel(model, x, warmup=warmup)
