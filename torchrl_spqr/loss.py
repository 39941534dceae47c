"""Deprecated location: ``SPQRLoss`` moved to :mod:`torchrl_spqr.objectives.spqr`.

``from torchrl_spqr.loss import SPQRLoss`` still works for one release and emits a
``FutureWarning`` naming the new location; import from :mod:`torchrl_spqr.objectives`
(or ``from torchrl_spqr import SPQRLoss``).
"""

from __future__ import annotations

import warnings
from typing import Any

from torchrl_spqr.objectives import spqr as _new

#: the public names that moved (all to the same module)
_MOVED = ("PAIRS", "SPQRLoss")

__all__ = list(_MOVED)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"torchrl_spqr.loss.{name} moved to torchrl_spqr.objectives.spqr.{name}; the old "
            "location will be removed in the next release",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(_new, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
