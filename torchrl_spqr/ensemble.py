"""Deprecated location: the critic ensemble moved to :mod:`torchrl_spqr.modules.ensemble`.

``from torchrl_spqr.ensemble import QEnsemble`` still works for one release and emits a
``FutureWarning`` naming the new location; import from :mod:`torchrl_spqr.modules`.
"""

from __future__ import annotations

import warnings
from typing import Any

from torchrl_spqr.modules import ensemble as _new

#: the public names that moved (all to the same module)
_MOVED = ("INIT_SCHEMES", "BatchedMLP", "QEnsemble", "init_linear_stack_", "make_q_member")

__all__ = list(_MOVED)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"torchrl_spqr.ensemble.{name} moved to torchrl_spqr.modules.ensemble.{name}; the "
            "old location will be removed in the next release",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(_new, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
