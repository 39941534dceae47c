"""Values checked against a dataclass schema: conversion to the field's type, clear errors.

:func:`convert_section` walks a plain mapping along a dataclass (nested dataclasses
are groups of fields), refuses an unknown field (naming the closest ones), converts
each value to its annotation (``int``, ``float``, ``bool``, ``str``, ``list[...]``,
``dict[str, Any]``, ``X | None``, ``Any``) with the conversions Hydra and the
``cfg_*`` readers accept (``"3"`` and ``3.0`` are 3, ``"1e-3"`` is a float, ``"true"``
is true) and fills in the defaults. :func:`hydra_node` is the same dataclass with
every leaf typed ``Any`` (Hydra's ``ConfigStore`` node: names and defaults only).
The schema itself is :mod:`torchrl_spqr.training.config`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from torchrl_spqr.training.fields import ConfigError, _show

__all__ = ["convert_section", "hydra_node", "to_plain"]

_REQUIRED = dataclasses.MISSING


def to_plain(cfg: Any) -> Any:
    """An OmegaConf config as plain dicts and lists (interpolations resolved); others unchanged."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        return cfg
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def convert_section(
    value: Any, cls: type, path: str = "", defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``value`` (a mapping) checked field by field against the dataclass ``cls``.

    ``path`` is the dotted name of the group (``""`` for the root), used in errors.
    ``defaults`` are the group's default values (``None``: the dataclass's own; a
    root passes its ``default_factory`` instances down, so a group's defaults can
    differ per root). Returns a plain dict with every field of ``cls``; raises
    ``ConfigError`` naming the field for an unknown name, a value of the wrong type
    or a required field (no default) that is not set. A null value gives the field's
    default unless the field allows null (``X | None``, ``Any``).
    """
    where = path or "the config"
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{path}={_show(value)}: expected a group of fields ({path}.FIELD=...); "
            f"set its fields one by one, e.g. {path}.{dataclasses.fields(cls)[0].name}=..."
        )
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3)
            hint = f"did you mean {', '.join(_dot(path, c) for c in close)}? " if close else ""
            raise ConfigError(
                f"{_dot(path, key)}: unknown field ({where} has {', '.join(names)}); {hint}"
                "remove it or correct its name."
            )
    base = _field_defaults(cls) if defaults is None else defaults
    out: dict[str, Any] = {}
    for name in names:
        key = _dot(path, name)
        inner, nullable = _unwrap_optional(hints[name])
        given = value.get(name)
        default = base.get(name, _REQUIRED)
        if given is None and name in value and (nullable or inner is Any):
            out[name] = None  # an explicit null where null is allowed
        elif dataclasses.is_dataclass(inner):
            sub = default if isinstance(default, Mapping) else None
            out[name] = convert_section({} if given is None else given, inner, key, sub)
        elif given is not None:
            out[name] = _convert(given, hints[name], key)
        elif default is _REQUIRED:
            raise ConfigError(f"{key} is not set: give it a value ({key}=...).")
        else:
            out[name] = copy.deepcopy(default)
    return out


def _field_defaults(cls: type) -> dict[str, Any]:
    """``cls``'s default values as plain data (a group: a dict); a required field is absent."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not _REQUIRED:
            out[f.name] = f.default
        elif f.default_factory is not _REQUIRED:
            value = f.default_factory()
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return tp, False


_WHAT = {int: "an integer", float: "a float", bool: "true or false", str: "a string"}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (the schema's annotation of ``key``), or a ConfigError."""
    tp, _ = _unwrap_optional(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return convert_section(value, tp, key)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise _type_error(key, value, f"a list of {_plural(item)}")
        try:
            return [_scalar(v, item) for v in value]
        except _Mismatch:
            raise _type_error(key, value, f"a list of {_plural(item)}") from None
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, value, "a group of fields (key: value)")
        return dict(value)
    try:
        return _scalar(value, tp)
    except _Mismatch:
        raise _type_error(key, value, _WHAT.get(tp, str(tp))) from None


class _Mismatch(Exception):
    pass


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(tp, "values")


def _scalar(value: Any, tp: Any) -> Any:
    """Hydra's and the old readers' conversions: ``"3"`` and ``3.0`` are 3, ``"1e-3"`` a float."""
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _Mismatch
    if isinstance(value, bool):
        raise _Mismatch  # true is not a number nor a name
    if tp is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"the schema's annotation {tp!r} is not supported")  # a bug in SCHEMAS


def _type_error(key: str, value: Any, what: str) -> ConfigError:
    return ConfigError(
        f"{key}={_show(value)}: expected {what}, got {_kind(value)}; set it on the command "
        f"line ({key}=...) or in the script's config.yaml."
    )


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true / false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a group of fields"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _dot(path: str, name: Any) -> str:
    return f"{path}.{name}" if path else str(name)


@functools.cache
def hydra_node(cls: type) -> type:
    """``cls`` with every leaf typed ``Any``: Hydra keeps the names and defaults, not the types.

    Hydra checks an override's key against the node and its type; the types are checked
    by :func:`resolve_config` instead, whose errors name the field and the fix.
    """
    specs = []
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(_hints(cls)[f.name])
        if dataclasses.is_dataclass(tp):
            factory = f.default_factory if f.default_factory is not _REQUIRED else tp
            node = hydra_node(tp)
            specs.append(
                (
                    f.name,
                    node,
                    dataclasses.field(default_factory=functools.partial(_as_node, node, factory)),
                )
            )
        elif f.default_factory is not _REQUIRED:
            specs.append((f.name, Any, dataclasses.field(default_factory=f.default_factory)))
        elif f.default is not _REQUIRED:
            specs.append((f.name, Any, dataclasses.field(default=f.default)))
        else:
            specs.append((f.name, Any, dataclasses.field(default="???")))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", specs)


def _as_node(node: type, factory: Any) -> Any:
    """An instance of the Hydra node ``node`` holding the defaults of ``factory()``."""
    return _fill(node, dataclasses.asdict(factory()))


def _fill(node: type, values: dict[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(node):
        v = values[f.name]
        kwargs[f.name] = _fill(f.type, v) if dataclasses.is_dataclass(f.type) else v
    return node(**kwargs)
