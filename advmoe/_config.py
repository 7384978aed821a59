"""Typed dataclass configs built from plain dicts (YAML), with strict key checking and dotted overrides.

Every config section is a dataclass. :func:`from_dict` builds one from a dict, recursing into fields
whose type is itself a config dataclass, and raises a ``ValueError`` that lists the known keys when it
meets an unknown one. :func:`apply_overrides` applies ``section.key=value`` strings (values parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

__all__ = ["apply_overrides", "deep_merge", "from_dict", "load_yaml", "parse_override", "to_dict"]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _config_class(annotation: Any) -> type | None:
    """The dataclass inside an annotation such as ``AttackConfig`` or ``AttackConfig | None``."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def from_dict(cls: type[T], data: Mapping[str, Any] | T | None, where: str = "config") -> T:
    """Build the dataclass ``cls`` from ``data``; unknown keys raise.

    Args:
        cls: a dataclass type.
        data: a mapping of field names to values (nested mappings for nested config dataclasses), an
            instance of ``cls`` (returned as is), or None (all defaults).
        where: dotted name of this section, used in error messages.

    Returns:
        An instance of ``cls``; each instance's ``__post_init__`` validates its values.

    Raises:
        ValueError: unknown key (the message lists the known ones) or a value rejected by validation.
    """
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(fields)}")
    hints = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        sub = _config_class(hints[name])
        if sub is not None and (isinstance(value, Mapping) or (value is None and sub is hints[name])):
            value = from_dict(sub, value, f"{where}.{name}")
        elif sub is not None and value is not None and not isinstance(value, sub):
            raise ValueError(f"{where}.{name} must be a mapping, got {type(value).__name__}: {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(config: Any) -> Any:
    """Plain-dict (JSON/YAML/checkpoint-safe) view of a config dataclass; tuples become lists."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, list | tuple):
        return [to_dict(v) for v in config]
    return config


EXTENDS_KEY = "extends"


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file (``yaml.safe_load``), resolving its ``extends:`` chain; an empty file gives ``{}``.

    A file may name another YAML file it builds on with a top-level ``extends: other.yaml`` (a path relative to
    the file's own folder). That file is read first (its own ``extends`` too), then this file's mapping is
    deep-merged over it (:func:`deep_merge`: nested mappings merge key by key, anything else replaces), and the
    ``extends`` key itself is dropped from the result.

    Args:
        path: the YAML file.

    Returns:
        The merged mapping.

    Raises:
        ValueError: a file that does not hold a mapping, an ``extends`` that is not a path string, a base that
            does not exist (the message names the file that asked for it), or a cycle of ``extends``.
        FileNotFoundError: ``path`` itself does not exist.
    """
    return _load_extending(Path(path), ())


def _load_extending(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping at top level, got {type(data).__name__}")
    if EXTENDS_KEY not in data:
        return data
    base = data.pop(EXTENDS_KEY)
    if not isinstance(base, str) or not base:
        raise ValueError(f"{EXTENDS_KEY} in {str(path)!r} must be a path to a YAML file, got {base!r}")
    here = path.resolve()
    chain = (*chain, here)
    base_path = (here.parent / base).resolve()
    if base_path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(base_path) :], base_path))
        raise ValueError(f"{EXTENDS_KEY} cycle: {cycle}")
    if not base_path.is_file():
        raise ValueError(f"{EXTENDS_KEY}: {base!r} in {str(path)!r} names a file that does not exist ({base_path})")
    return deep_merge(_load_extending(base_path, chain), data)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in: nested mappings merge key by key, other values replace.

    Args:
        base: the mapping to start from (not modified).
        update: the mapping whose values win, or None.

    Returns:
        A new nested dict (no structure shared with either argument).
    """
    out = _deep_copy(base)
    for key, value in (update or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = _deep_copy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"train.epochs=2"`` into (``["train", "epochs"]``, ``2``); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {text!r} has an empty key part")
    return parts, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of the nested dict ``data`` with each ``a.b.c=value`` override applied.

    Missing intermediate sections are created; whether a key is known is checked later by
    :func:`from_dict`, so a typo still raises with the list of known keys.
    """
    result = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {part!r} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
