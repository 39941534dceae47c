"""Old module locations kept for one release: one helper for every deprecated shim.

A shim module calls :func:`moved_names` with its own name and a table ``old name -> new
module``; the returned ``__getattr__`` serves each moved name from its new module (imported
only when asked for) with a ``FutureWarning`` that names the new location and points at the
caller's line.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved_names"]


def moved_names(
    old: str, moved: Mapping[str, str], removed: Mapping[str, str] | None = None
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for the deprecated module ``old``.

    Args:
        old: the deprecated module's name (``__name__``).
        moved: each public name that moved -> the module that holds it now (same name there).
        removed: names that are gone for good -> the message of their ``AttributeError``.
    """
    names = sorted(moved)
    gone = dict(removed or {})

    def __getattr__(name: str) -> Any:
        new = moved.get(name)
        if new is None:
            if name in gone:
                raise AttributeError(gone[name])
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old}.{name} moved to {new}.{name}; the old location will be removed in the "
            "next release",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new), name)

    def __dir__() -> list[str]:
        return list(names)

    return names, __getattr__, __dir__
