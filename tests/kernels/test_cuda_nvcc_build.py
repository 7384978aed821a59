"""Compile checks of the CUDA backend that need nvcc but no GPU.

- every kernel file ``csrc/cuda/*.cu`` compiles with ``nvcc -c`` for sm_80 and sm_90, without warnings, with
  the half/bf16 restrictions torch's extension build adds;
- the torch-free ``tests/cuda/standalone_test.cu`` (what compute-sanitizer runs on a GPU machine) compiles
  and links;
- the torch binding ``csrc/cuda/sparse_moe_conv2d_cuda.cpp`` passes a C++ syntax check against the installed
  torch headers (a CPU torch ships the c10/ATen CUDA headers, minus one generated file stubbed here).

Each test is skipped with a reason when nvcc (or a C++ compiler) is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import moe_kernels

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
STANDALONE = ROOT / "tests" / "cuda" / "standalone_test.cu"
KERNEL_FILES = sorted(p for p in CUDA_DIR.glob("*.cu") if not p.name.startswith("standalone"))
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
# torch.utils.cpp_extension compiles .cu files with these: no implicit half/bf16 conversions.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _own_warnings(stderr: str) -> list[str]:
    """Warning lines that point into our own sources (not into toolkit or torch headers)."""
    return [line for line in stderr.splitlines() if "warning" in line.lower() and "csrc/cuda" in line]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where the backend is absent")
def test_missing_cuda_backend_says_how_to_get_it():
    from moe_kernels.backends import BackendUnavailable
    from moe_kernels.backends import cuda as cuda_ext

    with pytest.raises(
        BackendUnavailable,
        match="ADVMOE_CUDA=1 pip install --no-build-isolation -e ." if torch.version.cuda is None else "GPU",
    ):
        cuda_ext.load()
    assert "cuda" not in moe_kernels.available_backends()
    assert moe_kernels.unavailable_reason("cuda")


def test_kernel_files_exist():
    assert [p.name for p in KERNEL_FILES] == ["sparse_moe_conv2d_kernel.cu"]
    assert (CUDA_DIR / "sparse_moe_conv2d_kernel.h").exists()
    assert STANDALONE.exists()


@needs_nvcc
@pytest.mark.parametrize("source", KERNEL_FILES, ids=lambda p: p.name)
def test_kernels_compile_for_sm80_and_sm90(source, tmp_path):
    out = tmp_path / (source.stem + ".o")
    flags = ["-c", "-std=c++17", "-O3", *ARCHS, *TORCH_NVCC_DEFINES, "-Xcompiler", "-Wall"]
    cmd = [NVCC, *flags, str(source), "-o", str(out)]
    result = _run(cmd)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    assert out.stat().st_size > 0
    assert not _own_warnings(result.stderr), result.stderr


def test_kernel_files_have_no_torch_dependency():
    for path in [*KERNEL_FILES, CUDA_DIR / "sparse_moe_conv2d_kernel.h", STANDALONE]:
        text = path.read_text()
        for banned in ("torch/", "ATen/", "c10/"):
            assert f"#include <{banned}" not in text, f"{path.name} includes a {banned} header"


@needs_nvcc
def test_standalone_program_compiles_and_links(tmp_path):
    exe = tmp_path / "standalone_test"
    cmd = [
        NVCC,
        "-std=c++17",
        "-O1",
        "-gencode",
        "arch=compute_90,code=sm_90",
        "-I",
        str(CUDA_DIR),
        "-o",
        str(exe),
        str(STANDALONE),
        str(CUDA_DIR / "sparse_moe_conv2d_kernel.cu"),
    ]
    result = _run(cmd)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    assert exe.exists() and os.access(exe, os.X_OK)


def _cuda_include_dir() -> Path | None:
    from torch.utils.cpp_extension import CUDA_HOME

    homes = [os.environ.get("CUDA_HOME"), CUDA_HOME, str(Path(NVCC).resolve().parent.parent), "/usr/local/cuda"]
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    return None


@pytest.mark.slow
@needs_nvcc
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_torch_binding_syntax(tmp_path):
    """The binding is compiled for real only on GPU machines; here g++ checks it against torch's headers."""
    from torch.utils.cpp_extension import include_paths

    cuda_include = _cuda_include_dir()
    if cuda_include is None:
        pytest.skip("the CUDA toolkit headers (cuda_runtime_api.h) were not found next to nvcc")
    torch_includes = [Path(p) for p in include_paths()]
    if not any((p / "c10" / "cuda" / "CUDAStream.h").exists() for p in torch_includes):
        pytest.skip("this torch installation ships no c10/cuda headers")
    stub = tmp_path / "stub"
    generated = "c10/cuda/impl/cuda_cmake_macros.h"  # generated by torch's CUDA build only
    if not any((p / generated).exists() for p in torch_includes):
        (stub / generated).parent.mkdir(parents=True)
        (stub / generated).write_text("#pragma once\n")
    flags = ["-isystem", str(stub)]
    for path in [*torch_includes, Path(sysconfig.get_paths()["include"]), cuda_include]:
        flags += ["-isystem", str(path)]
    cmd = [
        "g++",
        "-fsyntax-only",
        "-std=c++17",
        "-Wall",
        "-Wextra",
        *flags,
        "-DTORCH_EXTENSION_NAME=_C_cuda",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        str(CUDA_DIR / "sparse_moe_conv2d_cuda.cpp"),
    ]
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-6000:]
    assert not _own_warnings(result.stderr), result.stderr[-6000:]
