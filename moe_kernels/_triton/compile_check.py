"""Compiles the Triton kernels for an NVIDIA target without a GPU (the Triton twin of CI's nvcc check).

Catches what only the real compiler sees (unsupported constructs, dot shapes, type errors) on a
CPU-only machine, for the launch settings the backend would pick on a GPU. It does not run anything.

Usage: ``python -m moe_kernels._triton.compile_check [--arch 90] [--dtypes bf16,fp16,fp32]``. Must run
without ``TRITON_INTERPRET=1`` (the interpreter replaces the compiler); this module clears it itself
when run as a script. Needs the ``ptxas`` that ships with triton.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_DTYPES = ("bf16", "fp16", "fp32")


def _signature(fn, pointer_types: dict[str, str]) -> dict[str, str]:
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
        else:
            sig[name] = "*" + pointer_types[name] if name in pointer_types else "i32"
    return sig


def compile_all(
    arch: int = 90, dtypes: tuple[str, ...] = _DTYPES, widths: tuple[int, ...] = (64, 128, 19)
) -> list[str]:
    """Compiles forward, dgrad and wgrad for each dtype and expert width; returns one line per kernel.

    Widths at odd positions of ``widths`` compile the channels_last (TAP_MAJOR) variant.

    Raises:
        RuntimeError: ``TRITON_INTERPRET=1`` is set in this process.
        Any triton compilation error, unchanged.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (run it as `python -m ...`)")
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moe_kernels._triton import common
    from moe_kernels._triton.dgrad import moe_conv_dgrad_kernel
    from moe_kernels._triton.forward import moe_conv_fwd_kernel
    from moe_kernels._triton.wgrad import moe_conv_wgrad_kernel

    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    index = {"sample_ptr": "i64", "slot_ptr": "i64", "tile_expert_ptr": "i32", "tile_start_ptr": "i64",
             "tile_end_ptr": "i64"}  # fmt: skip
    lines = []
    for name in dtypes:
        dot = common.dot_settings(torch_dtypes[name])
        data = dict.fromkeys(("x_ptr", "w_ptr", "bias_ptr", "gate_ptr", "y_ptr", "go_ptr", "gx_ptr"), name)
        acc = {"gg_ptr": "fp32", "gw_ptr": "fp32", "gb_ptr": "fp32"}
        for i, width in enumerate(widths):
            tap_major = i % 2 == 1  # alternate the NCHW and channels_last K order
            fwd_blocks = common.gemm_blocks(width, torch_dtypes[name])
            kernels = [
                (moe_conv_fwd_kernel, fwd_blocks, {"HAS_BIAS": True, "HAS_GATE": True}),
                (moe_conv_dgrad_kernel, fwd_blocks, {"HAS_GATE": True, "NEED_X": True, "NEED_GATE": True}),
                (moe_conv_wgrad_kernel, common.wgrad_blocks(width, torch_dtypes[name]),
                 {"HAS_GATE": True, "NEED_W": True, "NEED_BIAS": True}),
            ]  # fmt: skip
            for fn, blocks, flags in kernels:
                consts = dict(KH=3, KW=3, TAP_MAJOR=tap_major, ACC_DTYPE=dot.acc_dtype, UPCAST=dot.upcast,
                              INPUT_PRECISION=dot.input_precision, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
                              BLOCK_K=blocks.block_k, **flags)  # fmt: skip
                src = ASTSource(fn=fn, signature=_signature(fn, {**index, **data, **acc}), constexprs=consts)
                start = time.perf_counter()
                options = {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                lines.append(
                    f"sm_{arch} {fn.__name__} {name} w={width} tap_major={tap_major} "
                    f"blocks={blocks.block_m}x{blocks.block_n}x{blocks.block_k}: ok, "
                    f"{kernel.metadata.shared} B shared, {time.perf_counter() - start:.1f} s"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90 (default 90)")
    parser.add_argument("--dtypes", default=",".join(_DTYPES), help="comma-separated subset of bf16,fp16,fp32")
    parser.add_argument("--widths", default="64,128,19", help="expert widths to compile for (block choice)")
    args = parser.parse_args(argv)
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    bad = [d for d in dtypes if d not in _DTYPES]
    if bad:
        parser.error(f"unknown dtypes {bad}; choose from {', '.join(_DTYPES)}")
    widths = tuple(int(w) for w in args.widths.split(","))
    for line in compile_all(args.arch, dtypes, widths):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
