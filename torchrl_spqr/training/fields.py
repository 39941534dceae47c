"""One config field at a time: read it, convert it, or raise a ``ConfigError`` naming it.

The readers (``cfg_int``, ``cfg_float``, ``cfg_bool``, ``cfg_choice``, ``cfg_sizes``,
``cfg_device``) take any config with ``get`` or attribute access (a plain dict, an
OmegaConf ``DictConfig``) and a dotted field name; each error names the field, the
value as given and what to set instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "ConfigError",
    "cfg_bool",
    "cfg_choice",
    "cfg_device",
    "cfg_float",
    "cfg_int",
    "cfg_sizes",
    "get_device",
]


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the value and the fix."""


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    """The value at ``dotted`` (``"optim.lr"``) of a mapping or attribute object; null: ``default``."""
    cur = cfg
    for part in dotted.split("."):
        if cur is None:
            return default
        cur = cur.get(part, None) if hasattr(cur, "get") else getattr(cur, part, None)
    return default if cur is None else cur


# ------------------------------------------------------------------ value checks
# Each check reads one field, converts it, and raises a ConfigError naming the field, the
# value and what to set instead. A resolved config (resolve_config) holds every field, so
# ``default`` only matters for a raw config without the field or with null.

_REQUIRED = object()


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def _raw(cfg, field: str, default: Any) -> Any:
    value = _get(cfg, field, None)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{field} is not set: give it a value ({field}=...).")
        return default
    return value


def _bad(field: str, value: Any, need: str, hint: str | None = None) -> ConfigError:
    hint = hint or f"set it on the command line ({field}=...) or in the script's config.yaml"
    return ConfigError(f"{field}={_show(value)}: expected {need}; {hint}.")


def _range_text(kind: str, lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi:g}"
    return kind


def cfg_int(
    cfg, field: str, default: Any = _REQUIRED, *, lo=None, hi=None, hint: str | None = None
) -> int:
    """``field`` as a whole number in ``[lo, hi]`` (``3.0`` is 3; ``3.5``, ``true``, ``'abc'`` fail)."""
    value = _raw(cfg, field, default)
    need = _range_text("an integer", lo, hi, False, False)
    n = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        n = int(value)
    elif isinstance(value, str):
        try:
            n = int(value.strip())
        except ValueError:
            n = None
    if n is None:
        raise _bad(field, value, need, hint)
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        raise _bad(field, value, need, hint)
    return n


def cfg_float(
    cfg,
    field: str,
    default: Any = _REQUIRED,
    *,
    lo=None,
    hi=None,
    lo_open: bool = False,
    hi_open: bool = False,
    hint: str | None = None,
) -> float:
    """``field`` as a finite number in the given range (``'abc'``, ``nan``, ``inf`` fail)."""
    value = _raw(cfg, field, default)
    need = _range_text("a finite number", lo, hi, lo_open, hi_open)
    v = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    elif isinstance(value, str):
        try:
            v = float(value.strip())
        except ValueError:
            v = None
    if v is None or not math.isfinite(v):
        raise _bad(field, value, need, hint)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise _bad(field, value, need, hint)
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise _bad(field, value, need, hint)
    return v


def cfg_bool(cfg, field: str, default: Any = False) -> bool:
    """``field`` as true / false (not any truthy string: ``resume=yes please`` fails)."""
    value = _raw(cfg, field, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _bad(field, value, "true or false")


def cfg_choice(cfg, field: str, choices, default: Any = _REQUIRED) -> str:
    """``field`` as one of ``choices``."""
    value = _raw(cfg, field, default)
    if not isinstance(value, str) or value not in choices:
        raise _bad(field, value, "one of " + ", ".join(map(str, choices)))
    return value


def cfg_sizes(cfg, field: str, default: Any = _REQUIRED) -> list[int]:
    """``field`` as a list of layer widths ``[w1, w2, ...]``, each an integer >= 1."""
    value = _raw(cfg, field, default)
    need = "a list of layer widths, each an integer >= 1 (e.g. [256,256])"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise _bad(field, value, need)
    sizes = list(value)
    for w in sizes:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise _bad(field, sizes, need)
    return sizes


def cfg_device(cfg, field: str = "device", default: str = "auto") -> torch.device:
    """``field`` as a torch device this machine has (``auto``: CUDA when available, else CPU)."""
    value = _raw(cfg, field, default)
    name = str(value).strip()
    if name == "auto":
        return get_device("auto")
    hint = "use device=auto (CUDA when there is a GPU, else CPU) or device=cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise _bad(field, value, "auto, cpu, cuda, cuda:K or mps", hint) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{field}={_show(value)}: CUDA is not available here (torch {torch.__version__}, "
                f"torch.cuda.is_available() is False); {hint}."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"{field}={_show(value)}: this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1}); choose one of them or {hint}."
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{field}={_show(value)}: MPS is not available here; {hint}.")
    elif dev.type != "cpu":
        raise _bad(field, value, "auto, cpu, cuda, cuda:K or mps", hint)
    return dev


def get_device(name: str | None = "auto") -> torch.device:
    """``auto`` (or ``None``): CUDA when available, else CPU; any other name as ``torch.device``."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
