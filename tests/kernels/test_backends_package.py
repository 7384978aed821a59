"""The backends package: registry in ``moe_kernels.backends``, one module per backend that never imports the
registry at import time (no import circle), public names unchanged."""

import ast
import importlib
import pathlib

import pytest
import torch

import moe_kernels
from moe_kernels import backends

BACKEND_MODULES = ["reference", "cpu", "cuda", "triton", "slices"]


@pytest.mark.parametrize("filename", [f"{name}.py" for name in BACKEND_MODULES + ["errors"]])
def test_backend_module_does_not_import_the_registry_at_import_time(filename):
    name = filename
    source = pathlib.Path(backends.__file__).with_name(filename).read_text()
    for node in ast.parse(source).body:  # module level only; lazy imports inside functions are fine
        if isinstance(node, ast.ImportFrom):
            assert node.module != "moe_kernels.backends", f"{name}.py imports the registry at module level"
            assert node.module not in ("moe_kernels", "moe_kernels.op"), f"{name}.py imports the package top"


def test_every_registered_backend_has_its_module():
    for name in backends._BACKENDS:
        module = importlib.import_module(f"moe_kernels.backends.{name}")
        assert callable(module.load)


def test_public_names_still_work():
    assert moe_kernels.BackendUnavailable is backends.errors.BackendUnavailable
    assert set(moe_kernels.available_backends()) >= {"reference"}
    assert moe_kernels.unavailable_reason("reference") is None
    assert backends.AUTO_ORDER["cpu"][-1] == "reference"
    assert backends.resolve_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        backends.get_backend("nope")
