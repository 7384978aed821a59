"""Build of advmoe's compiled backends.

Always builds the C++ CPU extension ``moe_kernels._C``. Builds the CUDA extension
``moe_kernels._C_cuda`` only where torch has CUDA and nvcc exists, controlled by ``ADVMOE_CUDA``:

    ADVMOE_CUDA=auto  (default) build it when a CUDA torch and nvcc are present
    ADVMOE_CUDA=1     build it, and fail with a clear message if that is impossible
    ADVMOE_CUDA=0     never build it

``TORCH_CUDA_ARCH_LIST`` (e.g. "8.0;9.0") selects the GPU architectures, as in every torch extension.

Host compiler: unless ``CXX`` is set, the build picks a g++ of the major version torch was built with
(``torch.__config__.show()``, e.g. "GCC 13.3"): ``/usr/bin/g++``, ``/usr/bin/g++-<major>`` or ``g++`` on
PATH, first match wins (a g++ wrapper first on PATH once produced extensions that crashed when a check
formatted its message). Without a match it warns, and with ``ADVMOE_CUDA=1`` it stops with the fix (set
``CC``/``CXX`` to a gcc/g++ of that version, or ``ADVMOE_ANY_COMPILER=1`` to build anyway).
Install torch first (``pip install torch==2.13.0``), then ``pip install --no-build-isolation -e .``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "advmoe: torch is not installed. Install it first (here: `pip install torch==2.13.0`), then "
        "`pip install --no-build-isolation -e .` so the build uses that torch instead of pulling another."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _torch_gcc_major() -> str | None:
    """Major version of the GCC torch was built with, from torch.__config__.show(), or None."""
    match = re.search(r"GCC (\d+)\.", torch.__config__.show())
    return match.group(1) if match else None


def _gxx_major(path: str) -> str | None:
    try:
        out = subprocess.run([path, "-dumpversion"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.split(".")[0] or None


def _choose_compiler() -> None:
    """Sets CC/CXX to a gcc/g++ of torch's GCC major version (see the module docstring), or warns / stops."""
    want = _torch_gcc_major()
    if "CXX" in os.environ or want is None:
        print(f"advmoe build: host compiler CXX={os.environ.get('CXX', '(default)')} (torch built with GCC {want})")
        return
    candidates = list(dict.fromkeys(["/usr/bin/g++", f"/usr/bin/g++-{want}", shutil.which("g++") or ""]))
    for cxx in candidates:
        if cxx and os.path.exists(cxx) and _gxx_major(cxx) == want:
            cc = cxx.replace("g++", "gcc")
            os.environ["CXX"] = cxx
            if os.path.exists(cc):
                os.environ.setdefault("CC", cc)
            print(f"advmoe build: host compiler {cxx} (GCC {want}, the major version torch was built with)")
            return
    found = ", ".join(f"{c} (GCC {_gxx_major(c)})" for c in candidates if c and os.path.exists(c)) or "none"
    message = (
        f"advmoe build: torch was built with GCC {want}, found {found}. Fix: install g++-{want} and set "
        f"CC=/usr/bin/gcc-{want} CXX=/usr/bin/g++-{want} (or ADVMOE_ANY_COMPILER=1 to build with another)"
    )
    if _cuda_mode() == "1" and os.environ.get("ADVMOE_ANY_COMPILER") != "1":
        sys.exit(message)
    print("WARNING: " + message)


def _cuda_mode() -> str:
    mode = os.environ.get("ADVMOE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"advmoe: ADVMOE_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _want_cuda() -> tuple[bool, str]:
    mode = _cuda_mode()
    if mode == "0":
        return False, "skipped (ADVMOE_CUDA=0)"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        problems.append("nvcc was not found (set CUDA_HOME)")
    if problems:
        if mode == "1":
            sys.exit(
                "advmoe: ADVMOE_CUDA=1 but the CUDA extension cannot be built: "
                + "; ".join(problems)
                + ". Install a CUDA build of torch and the CUDA toolkit, or unset ADVMOE_CUDA."
            )
        return False, "not built: " + "; ".join(problems)
    return True, f"building for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')}"


def _extensions():
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    cpu_sources = ["csrc/sparse_moe_conv2d.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    exts = [
        CppExtension(
            "moe_kernels._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]
    want_cuda, reason = _want_cuda()
    print(f"advmoe build: C++ CPU extension moe_kernels._C: building ({len(cpu_sources)} sources)")
    print(f"advmoe build: CUDA extension moe_kernels._C_cuda: {reason}")
    if want_cuda:
        # standalone_*.cu are torch-free test programs with their own main() (compute-sanitizer runs them).
        cuda_sources = [
            path
            for path in sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
            if not os.path.basename(path).startswith("standalone")
        ]
        exts.append(
            CUDAExtension(
                "moe_kernels._C_cuda",
                cuda_sources,
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            )
        )
    return exts


_choose_compiler()
setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
