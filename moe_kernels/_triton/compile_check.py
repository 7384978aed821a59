"""Compiles the Triton kernels for an NVIDIA target without a GPU, and inspects what the compiler made.

The launchers run on ``meta`` tensors of a realistic shape inside ``spec.recording()``, so exactly the
kernels and specialisations a GPU run of that shape would compile are compiled (argument types,
16-divisibility of ints and pointers, ints equal to 1 folded in), with triton's own compiler and its
bundled ``ptxas``. Each compiled kernel is then inspected:

* registers and spills: from ``ptxas -v`` run on the kernel's PTX (``spill stores/loads`` must be 0);
* shared memory: ``metadata.shared`` must fit the architecture's per-block limit;
* tensor cores: the PTX must contain ``wgmma`` (sm_90) or ``mma.sync`` (sm_80) when the kernel has a dot;
* TMA: the count of ``cp.async.bulk.tensor`` loads is reported (the forward's TMA weight-load variant).

Nothing runs on a GPU. Usage: ``python -m moe_kernels._triton.compile_check [--arch 90]
[--dtypes bf16,fp32] [--shapes c64w64,c35w40]``; must run without ``TRITON_INTERPRET=1`` (this module
clears it when run as a script).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_DTYPES = ("bf16", "fp16", "fp32")
# Per-block shared memory limits (bytes, with opt-in) by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Shapes of the check: name -> (C_in, expert width, kernel, stride); c64w64 is the target layer,
# c35w40 odd channel counts (zero-padded to 48 by the launcher), c3w64s1 a stem-like first layer.
SHAPES = {
    "c64w64": (64, 64, (3, 3), (1, 1)),
    "c35w40": (35, 40, (3, 3), (1, 1)),
    "c128w128s2": (128, 128, (3, 3), (2, 2)),
    "c3w64": (3, 64, (3, 3), (1, 1)),
}


@dataclass
class KernelReport:
    """What the compiler produced for one kernel specialisation."""

    name: str
    dtype: str
    shape: str
    config: str
    registers: int
    spill_bytes: int
    shared: int
    tensor_cores: bool
    has_dot: bool
    seconds: float
    tma_loads: int = 0

    def problems(self, arch: int) -> list[str]:
        """Reasons this kernel should not be used (empty list: fine)."""
        out = []
        if self.spill_bytes:
            out.append(f"{self.spill_bytes} bytes of register spills")
        if self.shared > SHARED_LIMIT.get(arch, 99 * 1024):
            out.append(f"{self.shared} B shared memory > {SHARED_LIMIT.get(arch)} B")
        if self.has_dot and not self.tensor_cores:
            out.append("no tensor-core instruction (wgmma / mma) in the PTX")
        return out

    def line(self, arch: int) -> str:
        status = "ok" if not self.problems(arch) else "REJECT " + "; ".join(self.problems(arch))
        return (
            f"sm_{arch} {self.name} {self.dtype} {self.shape} {self.config}: {status}, {self.registers} regs, "
            f"{self.spill_bytes} B spills, {self.shared} B shared, tensor cores {self.tensor_cores}, "
            f"TMA loads {self.tma_loads}, {self.seconds:.1f} s"
        )


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def record_launches(dtype_name: str, shape: str, configs: dict | None = None, batch: int = 256, size: int = 32):
    """The kernel launches of one forward (fused bias, gate, residual, ReLU) and one full backward.

    Args:
        dtype_name: "bf16", "fp16" or "fp32"; shape: a key of ``SHAPES`` or a (C_in, w, kernel, stride) tuple.
        configs: optional ``{"fwd"|"dgrad"|"wgrad": KernelConfig}`` forced for this recording.
        batch, size: B and the image side of the recorded call (E = 2, k = 1).

    Returns:
        list of ``spec.LaunchSpec``.
    """
    import torch

    from moe_kernels._triton import launcher, tuning
    from moe_kernels._triton.spec import recording
    from moe_kernels.call import ConvCall

    c_in, width, kernel, stride = SHAPES[shape] if isinstance(shape, str) else shape
    dtype = _torch_dtype(dtype_name)
    meta = dict(device="meta", dtype=dtype)
    experts = 2
    x = torch.empty(batch, c_in, size, size, **meta).contiguous(memory_format=torch.channels_last)
    weight = torch.empty(experts * width, c_in, *kernel, **meta)
    idx = torch.empty(batch, 1, dtype=torch.int64, device="meta")
    gate = torch.empty(batch, 1, **meta)
    bias = torch.empty(experts * width, **meta)
    pad = (kernel[0] // 2, kernel[1] // 2)
    h_out = (size + 2 * pad[0] - kernel[0]) // stride[0] + 1
    residual = torch.empty(batch, width, h_out, h_out, **meta).contiguous(memory_format=torch.channels_last)
    with tuning.forced_configs(configs or {}), recording() as launches:
        call = ConvCall(x, weight, idx, experts, gate, bias, stride, pad, (1, 1))
        launcher.conv_forward(call, residual=residual, relu=True)
        grad_out = torch.empty(batch, width, h_out, h_out, **meta).contiguous(memory_format=torch.channels_last)
        launcher.conv_backward(grad_out, call, (True,) * 4)
    return launches


def _ptxas(arch: int) -> str:
    """The ptxas triton itself uses for ``arch`` (its bundled one; a newer build for sm_90+)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) reported by ``ptxas -v`` for the kernel's PTX."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [_ptxas(arch), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = proc.stdout + proc.stderr
    regs = max((int(m) for m in re.findall(r"Used (\d+) registers", log)), default=0)
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log))
    return regs, spills


def compile_spec(launch, arch: int = 90):
    """Compiles one recorded launch for ``sm_<arch>``; returns the triton ``CompiledKernel``."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    signature, consts, attrs = {}, dict(launch.consts), {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            continue
        kind, spec = native_specialize_impl(BaseBackend, launch.args[name], False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            consts[name] = launch.args[name]
        elif spec and "D" in spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch.options)


def inspect_launches(launches, arch: int, dtype_name: str, shape: str) -> list[KernelReport]:
    """Compiles and inspects each distinct recorded launch."""
    reports, seen = [], set()
    for launch in launches:
        key = (launch.name, tuple(sorted((k, str(v)) for k, v in launch.consts.items())))
        if key in seen:
            continue
        seen.add(key)
        start = time.perf_counter()
        kernel = compile_spec(launch, arch)
        regs, spills = _ptxas_usage(kernel.asm["ptx"], arch)
        ptx = kernel.asm["ptx"]
        c = launch.consts
        config = f"{c.get('BLOCK_M', '-')}x{c.get('BLOCK_N', '-')}x{c.get('BLOCK_K', c.get('BLOCK', '-'))}"
        config += f"_w{launch.options.get('num_warps', 4)}_s{launch.options.get('num_stages', 3)}"
        reports.append(
            KernelReport(
                name=launch.name,
                dtype=dtype_name,
                shape=shape,
                config=config,
                registers=regs,
                spill_bytes=spills,
                shared=kernel.metadata.shared,
                tensor_cores="wgmma" in ptx or "mma.sync" in ptx,
                has_dot="BLOCK_K" in c,
                seconds=time.perf_counter() - start,
                tma_loads=ptx.count("cp.async.bulk.tensor"),
            )
        )
    return reports


def check(arch: int = 90, dtypes=("bf16", "fp32"), shapes=("c64w64",)) -> list[KernelReport]:
    """Default launch settings of every kernel, per dtype and shape, compiled and inspected.

    Raises:
        RuntimeError: ``TRITON_INTERPRET=1`` is set in this process.
        Any triton compilation error, unchanged.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (run it as `python -m ...`)")
    import torch

    from moe_kernels._triton import tuning

    reports = []
    for dtype_name in dtypes:
        for shape in shapes:
            reports += inspect_launches(record_launches(dtype_name, shape), arch, dtype_name, shape)
        if arch >= 90 and "c64w64" in shapes:  # the forward with TMA weight loads (a tuning candidate)
            default = tuning.default_config(
                "fwd",
                {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name, torch.float32),
                SHAPES["c64w64"][1],
            )
            launches = record_launches(dtype_name, "c64w64", {"fwd": dataclasses.replace(default, tma=True)})
            fwd = [launch for launch in launches if launch.consts.get("USE_TMA")]
            reports += inspect_launches(fwd, arch, dtype_name, "c64w64+tma")
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90 (default 90)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated subset of bf16,fp16,fp32")
    parser.add_argument("--shapes", default="c64w64,c35w40", help=f"comma-separated subset of {','.join(SHAPES)}")
    args = parser.parse_args(argv)
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    shapes = tuple(s for s in args.shapes.split(",") if s)
    bad = [d for d in dtypes if d not in _DTYPES] + [s for s in shapes if s not in SHAPES]
    if bad:
        parser.error(f"unknown dtypes/shapes {bad}; dtypes: {', '.join(_DTYPES)}; shapes: {', '.join(SHAPES)}")
    failed = 0
    for report in check(args.arch, dtypes, shapes):
        print(report.line(args.arch), flush=True)
        failed += bool(report.problems(args.arch))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
