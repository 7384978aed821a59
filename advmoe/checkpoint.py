"""Checkpoints: the training checkpoint format, the one model loader, and safe, fault-tolerant I/O.

:func:`load_model` rebuilds a model from an ``advmoe train`` checkpoint (format :data:`CHECKPOINT_FORMAT`)
or, given :class:`ResearchSpec`, from a checkpoint of the public research code; the file is read once.

Guarantees:

- **Loading never executes code.** :func:`load_checkpoint` uses ``torch.load(weights_only=True)``, which
  only rebuilds tensors, numbers, strings, booleans, ``None`` and lists/tuples/dicts of them. A file that
  needs anything else (a pickled class, a function, a numpy array) is refused with
  :class:`UnsafeCheckpointError`; it is never unpickled. Checkpoints of the public research code
  (``{"state_dict", "router", "epoch", ...}``) hold only such values and load fine.
- **Saving is atomic.** :func:`save_checkpoint` writes a temporary file in the target directory, flushes
  and fsyncs it, then ``os.replace``-s it over the target and fsyncs the directory: a crash (even
  SIGKILL or a power cut after the fsync) leaves either the old or the new checkpoint, never a torn one.
  What is saved is checked first with :func:`check_checkpoint_tree`, so every checkpoint we write loads
  with ``weights_only=True``.
- **Output directories are checked before work starts.** :func:`check_output_dir` creates the directory,
  writes and removes a probe file, and checks the free space.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "ResearchSpec",
    "UnsafeCheckpointError",
    "capture_rng_state",
    "check_checkpoint_tree",
    "check_output_dir",
    "load_checkpoint",
    "load_model",
    "load_trained_model",
    "restore_rng_state",
    "save_checkpoint",
]

_SCALARS = (bool, int, float, str, type(None))

CHECKPOINT_FORMAT = "advmoe.train/1"
"""The ``format`` entry of every checkpoint ``advmoe train`` writes (``last.pt``, ``best_ra.pt``)."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds (or would need) objects other than tensors, numbers, strings and containers."""


def check_checkpoint_tree(obj: Any, where: str = "checkpoint") -> None:
    """Check that ``obj`` holds only what ``torch.load(weights_only=True)`` accepts and we allow.

    Allowed: tensors, ``torch.Size``, bool/int/float/str/None, and lists, tuples and dicts (string or int
    keys) of allowed values.

    Args:
        obj: the object to check.
        where: name used in the error message for the root object.

    Raises:
        UnsafeCheckpointError: naming the path of the first offending entry and its type.
    """
    if isinstance(obj, (torch.Tensor, torch.Size, *_SCALARS)):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise UnsafeCheckpointError(f"{where} has a key of type {type(key).__name__} ({key!r}); use str or int")
            check_checkpoint_tree(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_checkpoint_tree(value, f"{where}[{i}]")
        return
    raise UnsafeCheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints may only hold tensors, numbers, "
        "strings, booleans, None and lists/tuples/dicts of them (so they load with torch.load(weights_only=True))"
    )


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write a checkpoint dict to ``path``.

    Args:
        obj: dict of tensors/numbers/strings/lists (checked with :func:`check_checkpoint_tree`).
        path: destination file; its directory must exist.

    Returns:
        The destination path.

    Raises:
        UnsafeCheckpointError: ``obj`` holds something that would not load with ``weights_only=True``.
        OSError: the file could not be written (the previous checkpoint at ``path`` is left intact).
    """
    if not isinstance(obj, Mapping):
        raise UnsafeCheckpointError(f"checkpoint must be a dict, got {type(obj).__name__}")
    check_checkpoint_tree(obj)
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code (``torch.load(weights_only=True)``).

    Args:
        path: checkpoint file (ours, a plain state dict, or a research-code checkpoint).
        map_location: where to put the tensors (default CPU).

    Returns:
        The loaded dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file needs arbitrary unpickling (refused, nothing was executed), or is
            not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors, numbers, strings and "
            f"containers, and unpickling them could execute code. Only weights_only checkpoints are accepted. "
            f"(torch said: {str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise UnsafeCheckpointError(f"{str(path)!r} is not a readable torch checkpoint: {err}") from None
    if not isinstance(obj, dict):
        raise UnsafeCheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, expected a dict")
    return obj


@dataclass(frozen=True)
class ResearchSpec:
    """How to rebuild a research-code checkpoint, which does not record its architecture.

    Attributes:
        arch: our model name or the research name, e.g. ``resnet18_cifar`` or ``resnet18_cifar_moe``.
        num_experts: E (None or 1 for the research dense ``_ori`` models).
        ratio: the width ratio it was trained with.
        num_classes: classifier outputs.
    """

    arch: str
    num_experts: int | None = 2
    ratio: float = 0.5
    num_classes: int = 10


def is_research_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """Whether a loaded dict has the research code's layout ``{"state_dict", "router", ...}``."""
    return "state_dict" in ckpt and "router" in ckpt


def load_model(
    path: str | os.PathLike | Mapping[str, Any],
    research: ResearchSpec | Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model (eval mode) from a checkpoint, reading the file once (``weights_only=True``).

    An ``advmoe train`` checkpoint (``format == CHECKPOINT_FORMAT``) records its model arguments and is
    rebuilt from them (``research`` is then not needed and not used). Any other file is read as a
    research-code checkpoint (or a bare state dict of one), which needs ``research``.

    Args:
        path: checkpoint file, or the dict :func:`load_checkpoint` returned for it.
        research: how to rebuild a research-code checkpoint (a :class:`ResearchSpec` or a dict of its
            fields); None for our own checkpoints.
        device: where to put the model.

    Returns:
        (model in eval mode, the loaded checkpoint dict). For our checkpoints the dict holds ``model_args``,
        ``config`` (the run's resolved config, e.g. ``config["data"]``), ``state``, ...

    Raises:
        FileNotFoundError / UnsafeCheckpointError: see :func:`load_checkpoint`.
        ValueError: a research-code checkpoint without ``research``, a file that is neither kind, or
            weights that do not fit the described architecture.
    """
    ckpt = dict(path) if isinstance(path, Mapping) else load_checkpoint(path)
    where = "the checkpoint" if isinstance(path, Mapping) else repr(str(path))
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        from advmoe.models import create_model

        model = create_model(**ckpt["model_args"])
        model.load_state_dict(ckpt["model"])
    elif research is not None:
        from advmoe.deploy.research_checkpoint import load_research_checkpoint

        spec = research if isinstance(research, ResearchSpec) else ResearchSpec(**research)
        model = load_research_checkpoint(ckpt, spec.arch, spec.num_experts, spec.ratio, spec.num_classes)
    elif is_research_checkpoint(ckpt):
        raise ValueError(
            f"{where} is a research-code checkpoint: say which architecture it is (research=ResearchSpec(arch=...); "
            "on the command line --arch, and --num-experts/--ratio/--num-classes)"
        )
    else:
        raise ValueError(
            f"{where} is neither an `advmoe train` checkpoint (format {ckpt.get('format')!r}, expected "
            f"{CHECKPOINT_FORMAT!r}) nor a research-code checkpoint"
        )
    return model.to(device).eval(), ckpt


def load_trained_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """:func:`load_model` for an ``advmoe train`` checkpoint (the name the docs use); returns (model, checkpoint)."""
    return load_model(path, device=device)


def check_output_dir(path: str | os.PathLike, min_free_mb: float = 100.0) -> Path:
    """Make sure ``path`` exists, is writable and has at least ``min_free_mb`` MiB free.

    Called before training starts, so an unwritable or full disk fails at once, not after an epoch.

    Args:
        path: output directory (created with parents if missing).
        min_free_mb: required free space in MiB.

    Returns:
        The directory as a ``Path``.

    Raises:
        PermissionError / OSError: the directory cannot be created or written (message names it).
        OSError: less than ``min_free_mb`` MiB free.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise type(err)(f"output directory {str(path)!r} cannot be created: {err}") from None
    probe = path / f".write_probe_{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise type(err)(err.errno, f"output directory {str(path)!r} is not writable: {err.strerror}") from None
    finally:
        if probe.exists():
            probe.unlink()
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < min_free_mb:
        raise OSError(
            f"output directory {str(path)!r} has only {free_mb:.1f} MiB free, need at least {min_free_mb:.1f} MiB "
            "(set train.min_free_mb to change the threshold)"
        )
    return path


def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and every CUDA device), numpy and ``random``, as checkpoint-safe values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), *map(_num, np_state[2:])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state` (CUDA states only where devices exist)."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


def _num(value: Any) -> int | float:
    return float(value) if isinstance(value, float) else int(value)


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_lists(v) for v in value]
    return value


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value
