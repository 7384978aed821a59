"""Launch configurations of the NHWC kernels: defaults, candidates, and the tuned table per GPU.

Tuning happens once per GPU model, not at run time: ``moe_kernels._triton.tune`` (run on a GPU) times
the candidates of ``candidate_configs`` that survived the CPU prune (``compile_check.prune``: compiles
for sm_90 with no register spills, shared memory within the limit and tensor-core instructions in
the PTX) and writes ``tuned/<gpu>.json``. At run time ``get_config`` looks the shape class up in that
table; a GPU without a table, or a shape class the table does not list, gets ``default_config`` --
never an error -- and ``config_reason`` says which happened (unknown GPUs also warn once).

Table format (JSON)::

    {"gpu": "NVIDIA H200", "arch": 90, "triton": "3.9.0",
     "configs": {"fwd|bf16|c64_w64_k3x3_s1": {"block_m": 128, "block_n": 64, "block_k": 64,
                                               "num_warps": 4, "num_stages": 3}, ...},
     "auto": {"bf16|c64_w64_k3x3_s1": {"backend": "triton", "triton_us": ..., "cudnn_us": ...}, ...}}

``configs`` keys are ``kind|dtype|shape_class`` with kind in fwd, dgrad, wgrad; ``auto`` holds the
measured forward+backward time of the Triton backend and of the cuDNN path per dtype and shape class
(used by ``choose_backend``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

KINDS = ("fwd", "dgrad", "wgrad")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
TUNED_DIR = Path(__file__).parent / "tuned"


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch settings of one NHWC kernel.

    Attributes:
        block_m: GEMM rows per tile (pixels); for wgrad the row step of the reduction.
        block_n: output columns per program (expert width for fwd/wgrad, C_in for dgrad).
        block_k: reduction step (channels of one tap; for wgrad the C_in block of one tap).
        num_warps, num_stages: as in ``triton.Config``.
        programs_per_sm: persistent-grid size of fwd/dgrad (programs = SMs x this, at most the tiles).
        tma: fwd only: load the weight blocks through a TMA tensor descriptor (sm_90+; untimed so far).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 2
    tma: bool = False

    def key(self) -> str:
        tma = "_tma" if self.tma else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k}_w{self.num_warps}_s{self.num_stages}{tma}"


# Under TRITON_INTERPRET=1 every kernel runs with this one configuration; tests shrink it (monkeypatch).
# channel_pad: K channels padded to a multiple of this (compiled kernels: 16, see launcher.channel_pad_multiple).
# tma: the forward loads weight blocks through a tensor descriptor.
INTERPRETER_CONFIG = {
    "block_m": 32,
    "block_n": 32,
    "block_k": 32,
    "programs": 4,
    "wgrad_chunks": 4,
    "channel_pad": 16,
    "tma": False,
}


def _pow2_at_least(value: int, low: int, high: int) -> int:
    power = low
    while power < value and power < high:
        power *= 2
    return power


def shape_class(c_in: int, width: int, kernel: tuple[int, int], stride: tuple[int, int]) -> str:
    """Coarse shape key of the table: channels rounded up to a power of two (16..512), kernel, stride."""
    cb, wb = _pow2_at_least(c_in, 16, 512), _pow2_at_least(width, 16, 512)
    return f"c{cb}_w{wb}_k{kernel[0]}x{kernel[1]}_s{stride[0]}x{stride[1]}"


def default_config(kind: str, dtype: torch.dtype, cols: int) -> KernelConfig:
    """Safe sm_80/sm_90 configuration (compile-checked for sm_90, see tests/kernels/test_triton_sm90_ptx.py).

    Args:
        kind: "fwd", "dgrad" or "wgrad".
        dtype: input dtype.
        cols: output columns of the GEMM (expert width for fwd/wgrad, C_in for dgrad).
    """
    wide = dtype in (torch.float16, torch.bfloat16)
    block_k = 64 if wide else 32
    if kind == "wgrad":
        return KernelConfig(64 if wide else 32, _pow2_at_least(cols, 16, 64), block_k, num_warps=4, num_stages=3)
    block_n = _pow2_at_least(cols, 16, 128 if wide else 64)
    # fp32 (TF32) at 128x64 sits at 255 registers; 4 stages compiled without spills on every checked shape.
    return KernelConfig(
        128 if block_n <= 64 else 64, block_n, block_k, num_warps=4 if block_n <= 64 else 8, num_stages=3 if wide else 4
    )


def candidate_configs(kind: str, dtype: torch.dtype, cols: int) -> list[KernelConfig]:
    """The few configurations worth timing for one kernel kind, dtype and column count (default first)."""
    wide = dtype in (torch.float16, torch.bfloat16)
    block_k = 64 if wide else 32
    n_small = _pow2_at_least(cols, 16, 64)
    n_big = _pow2_at_least(cols, 16, 128 if wide else 64)
    if kind == "wgrad":
        raw = [
            (64, n_small, block_k, 4, 3),
            (128, n_small, block_k, 8, 3),
            (32, n_small, block_k, 4, 4),
            (64, n_small, 2 * block_k, 8, 3),
        ]
    else:
        raw = [
            (128, n_big, block_k, 4 if n_big <= 64 else 8, 3),
            (128, n_small, block_k, 4, 4),
            (64, n_small, block_k, 4, 4),
            (256, n_small, block_k, 8, 3),
            (128, n_big, 2 * block_k, 8, 2),
        ]
    out = [default_config(kind, dtype, cols)]
    if kind == "fwd":
        out.append(dataclasses.replace(out[0], tma=True))
    for m, n, k, warps, stages in raw:
        cfg = KernelConfig(m, n, k, warps, stages)
        if cfg not in out:
            out.append(cfg)
    return out


def gpu_slug(name: str) -> str:
    """File-name form of a GPU name: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@lru_cache(maxsize=8)
def _load_table(slug: str) -> dict | None:
    path = Path(os.environ.get("ADVMOE_TRITON_TUNED_DIR", TUNED_DIR)) / f"{slug}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


_warned: set[str] = set()
_reasons: dict[tuple, str] = {}


def _device_table(device: torch.device) -> tuple[dict | None, str]:
    if device.type != "cuda":
        return None, "not a CUDA device"
    name = torch.cuda.get_device_name(device)
    table = _load_table(gpu_slug(name))
    if table is None:
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"moe_kernels triton: no tuned table for {name!r} ({TUNED_DIR}/{gpu_slug(name)}.json): the Triton "
                "kernels use safe default launch settings and backend='auto' prefers the cuDNN path "
                "(run `python -m moe_kernels._triton.tune` on this GPU)",
                stacklevel=4,
            )
        return None, f"no tuned table for {name}"
    return table, name


_overrides: dict[str, KernelConfig] = {}


@contextmanager
def forced_configs(configs: dict[str, KernelConfig]) -> Iterator[None]:
    """Inside the block, kinds listed in ``configs`` ("fwd", "dgrad", "wgrad") use the given configuration
    (the CPU prune and the tuner compile and time candidates this way)."""
    previous = dict(_overrides)
    _overrides.update(configs)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(previous)


def get_config(
    kind: str,
    dtype: torch.dtype,
    c_in: int,
    width: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    device: torch.device,
) -> KernelConfig:
    """Launch configuration of one kernel; never fails (defaults for anything not in the table).

    Under the interpreter: ``INTERPRETER_CONFIG``. The reason of the last choice per key is kept for
    ``config_reason``.
    """
    from moe_kernels._triton.common import interpreted

    cols = c_in if kind == "dgrad" else width
    key = (kind, DTYPE_NAMES.get(dtype, str(dtype)), shape_class(c_in, width, kernel, stride))
    if kind in _overrides:
        _reasons[key] = "forced (tuning / compile check)"
        return _overrides[kind]
    if interpreted():
        cfg = INTERPRETER_CONFIG
        _reasons[key] = "interpreter configuration"
        return KernelConfig(
            cfg["block_m"],
            cfg["block_n"],
            cfg["block_k"],
            num_warps=1,
            num_stages=1,
            tma=cfg.get("tma", False) and kind == "fwd",
        )
    table, source = _device_table(device)
    entry = (table or {}).get("configs", {}).get("|".join(key))
    if entry is None:
        _reasons[key] = f"default ({source if table is None else f'shape class not in the table of {source}'})"
        return default_config(kind, dtype, cols)
    _reasons[key] = f"tuned table of {source}"
    return KernelConfig(**entry)


def config_reason(kind: str, dtype: torch.dtype, c_in: int, width: int, kernel, stride) -> str | None:
    """Why the last launch of this kind / dtype / shape class used its configuration (None: not launched)."""
    return _reasons.get((kind, DTYPE_NAMES.get(dtype, str(dtype)), shape_class(c_in, width, kernel, stride)))


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def choose_backend(
    dtype: torch.dtype,
    c_in: int,
    width: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    device: torch.device,
    available: tuple[str, ...] = ("cuda", "triton", "reference"),
) -> tuple[str, str]:
    """The GPU backend ``backend="auto"`` should use for this shape and dtype, and why.

    Triton vs the cuDNN path (the ``cuda`` backend's cuDNN per expert group, else ``slices`` or the
    reference's per-expert ``F.conv2d``) is decided by the measured times in the tuned table of this GPU. Without a
    table entry the choice is the cuDNN path (the kernels are untuned there). Unsupported dtypes never
    pick Triton.

    Args:
        dtype, c_in, width, kernel, stride: of the call; device: a CUDA device.
        available: the backends present, in the default order of preference.

    Returns:
        (backend name, reason in words).
    """
    cudnn = next((b for b in available if b in ("cuda", "slices", "reference")), "reference")
    if device.type != "cuda":
        return (available[0] if available else "reference"), "not a CUDA device: the device's default order"
    if dtype not in SUPPORTED_DTYPES:
        return cudnn, f"dtype {dtype} is not supported by the Triton kernels"
    if "triton" not in available:
        return cudnn, "the Triton backend is not available"
    table, source = _device_table(device)
    cls = f"{DTYPE_NAMES[dtype]}|{shape_class(c_in, width, kernel, stride)}"
    entry = (table or {}).get("auto", {}).get(cls)
    if entry is None:
        where = source if table is None else f"no measurement of {cls} in the table of {source}"
        return cudnn, f"{where}: the cuDNN path by default"
    choice = "triton" if entry["backend"] == "triton" else cudnn
    return choice, (
        f"tuned table of {source}: triton {entry['triton_us']:.1f} us vs cuDNN path {entry['cudnn_us']:.1f} us "
        f"(forward+backward, {cls})"
    )


def config_dict(cfg: KernelConfig) -> dict:
    """JSON form of a configuration (as stored in the table)."""
    return asdict(cfg)
