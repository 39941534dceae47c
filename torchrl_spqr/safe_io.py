"""Read back run-folder files without unpickling anything.

Everything the package reads from a run folder (checkpoint state files, the
replay buffer saved as a tensordict memmap) goes through this module:

- :func:`load_state` reads a ``torch.save`` file with ``torch.load(weights_only=True)``
  (tensors and plain Python containers only) and turns an empty, truncated or
  foreign file into a :class:`CorruptFileError` that names the file;
- :func:`load_memmap` first checks that a memmap folder holds only what a
  memmap of plain tensors holds (``meta.json`` files and one ``.memmap`` file
  per tensor, each of exactly the size its ``meta.json`` entry gives), then
  loads it with ``TensorDict.load_memmap(..., allow_pickle=False)``. Anything
  else (a ``*.pickle`` / ``*.pkl`` sidecar, a non-tensor or tensorclass entry, a
  link, a stray file) raises :class:`UnsafeFileError` naming the file, before
  tensordict reads the folder; a truncated or missing tensor file raises
  :class:`CorruptFileError` (tensordict would load it zero-filled or drop it).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CorruptFileError",
    "UnsafeFileError",
    "check_memmap_dir",
    "load_memmap",
    "load_state",
]

#: The ``_type`` tensordict writes for a plain TensorDict (the only one accepted).
_TD_TYPE = "<class 'tensordict._td.TensorDict'>"
#: Metadata keys of a ``meta.json`` that are not entries.
_META_KEYS = {"shape", "device", "_type", "names"}


class UnsafeFileError(RuntimeError):
    """A run-folder file that could execute code, or is not what the package writes."""


class CorruptFileError(RuntimeError):
    """A run-folder file that is truncated, empty or unreadable."""


def load_state(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with a clear error for a damaged file."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafeFileError(f"{path} is a symbolic link; refusing to follow it.")
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing.")
    size = path.stat().st_size
    if size == 0:
        raise CorruptFileError(f"{path} is empty (0 bytes): the file was cut off while written.")
    try:
        return torch.load(path, weights_only=True, map_location=map_location)
    except Exception as err:
        kind = (
            "holds objects other than tensors and plain Python values"
            if "weights_only" in str(err) or "Unsupported global" in str(err)
            else "is truncated or corrupted"
        )
        raise CorruptFileError(
            f"{path} ({size} bytes) cannot be read: it {kind} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
        ) from None


def _dtype(name: Any, where: Path, key: str) -> torch.dtype:
    if isinstance(name, str) and name.startswith("torch."):
        dt = getattr(torch, name[len("torch.") :], None)
        if isinstance(dt, torch.dtype):
            return dt
    raise UnsafeFileError(f"{where}: entry {key!r} has an unknown dtype {name!r}.")


def _encoded(key: str) -> str:
    try:
        from tensordict._utils_key_json import _encode_key_for_filesystem

        return _encode_key_for_filesystem(key, robust=True)
    except ImportError:  # pragma: no cover - other tensordict layouts
        return key


def _child_name(folder: Path, key: str, suffix: str, meta_path: Path) -> str:
    """The name tensordict gives ``key``'s file or folder (never a path outside ``folder``)."""
    enc = _encoded(key) + suffix
    legacy = key + suffix
    simple = key not in ("", ".", "..") and not any(c in key for c in "/\\\0")
    if (folder / enc).exists() or not simple:
        if "/" in enc or "\\" in enc or enc in (".", ".."):
            raise UnsafeFileError(f"{meta_path}: entry {key!r} is not a valid file name.")
        return enc
    return legacy


def check_memmap_dir(path: str | os.PathLike) -> None:
    """Refuse a memmap folder that holds anything but plain tensors (see module docstring)."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafeFileError(f"{path} is a symbolic link; refusing to follow it.")
    if not path.is_dir():
        raise CorruptFileError(f"{path} is not a folder (expected a tensordict memmap).")
    _check_folder(path)


def _check_folder(folder: Path) -> None:
    meta_path = folder / "meta.json"
    if meta_path.is_symlink() or not meta_path.is_file():
        raise CorruptFileError(f"{meta_path} is missing: {folder} is not a complete memmap.")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CorruptFileError(f"{meta_path} is not valid JSON ({err}).") from None
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{meta_path} is not a JSON object.")
    if meta.get("_type") != _TD_TYPE:
        raise UnsafeFileError(
            f"{meta_path}: type {meta.get('_type')!r} is not a plain TensorDict "
            "(non-tensor and tensorclass contents are not loaded: they can need unpickling)."
        )
    expected: dict[str, tuple[str, Any]] = {"meta.json": ("meta", None)}
    for key, entry in meta.items():
        if key in _META_KEYS or not isinstance(entry, dict):
            continue
        if "type" in entry:
            if entry["type"] != "TensorDict":
                raise UnsafeFileError(
                    f"{meta_path}: entry {key!r} is a {entry['type']!r}, not a tensor or a "
                    "TensorDict (non-tensor contents can need unpickling)."
                )
            expected[_child_name(folder, key, "", meta_path)] = ("dir", None)
            continue
        if entry.get("is_nested", False):
            raise UnsafeFileError(f"{meta_path}: entry {key!r} is a nested tensor (not accepted).")
        if "dtype" not in entry or "shape" not in entry:
            raise UnsafeFileError(f"{meta_path}: entry {key!r} has no dtype / shape.")
        dt = _dtype(entry["dtype"], meta_path, key)
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise UnsafeFileError(f"{meta_path}: entry {key!r} has an invalid shape {shape!r}.")
        size = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        expected[_child_name(folder, key, ".memmap", meta_path)] = ("file", size)
    for child in sorted(folder.iterdir()):
        name = child.name
        if child.is_symlink():
            raise UnsafeFileError(f"{child} is a symbolic link; refusing to follow it.")
        if name not in expected:
            hint = (
                "a pickle file (loading it could execute arbitrary code)"
                if name.endswith((".pickle", ".pkl", ".pt", ".pth")) or name.startswith("other.")
                else "not part of a memmap of plain tensors"
            )
            raise UnsafeFileError(f"{child} is {hint}; refusing to load {folder}.")
        kind, info = expected.pop(name)
        if kind == "dir":
            if not child.is_dir():
                raise CorruptFileError(f"{child} should be a folder.")
            _check_folder(child)
        elif kind == "file":
            if not child.is_file():
                raise UnsafeFileError(f"{child} is not a regular file.")
            size = child.stat().st_size
            if size != info:
                raise CorruptFileError(
                    f"{child} holds {size} bytes, {meta_path} says {info}: the file is "
                    "truncated or does not belong to this memmap."
                )
    for name, (kind, info) in expected.items():
        if kind == "file" and info == 0:
            continue  # tensordict writes no file for an empty tensor
        raise CorruptFileError(f"{folder / name} is missing (listed in {meta_path}).")


def load_memmap(path: str | os.PathLike):
    """``TensorDict.load_memmap`` of a folder checked by :func:`check_memmap_dir`."""
    from tensordict import TensorDict

    check_memmap_dir(path)
    return TensorDict.load_memmap(Path(path), allow_pickle=False)
