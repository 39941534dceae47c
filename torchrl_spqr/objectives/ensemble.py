"""Deprecated location: the ensemble losses moved to one module each.

``SACNLoss`` to :mod:`torchrl_spqr.objectives.sac_n`, ``ReferenceREDQLoss`` and the MBPO
target entropies to :mod:`torchrl_spqr.objectives.redq`, ``EDACLoss`` to
:mod:`torchrl_spqr.objectives.edac`, ``CQLNLoss`` to :mod:`torchrl_spqr.objectives.cql_n`.
The old imports still work for one release and emit a ``FutureWarning`` naming the new
location; import from :mod:`torchrl_spqr.objectives`.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

from torchrl_spqr.objectives import cql_n, edac, redq, sac_n

#: each moved public name and the module that holds it now
_MOVED: dict[str, ModuleType] = {
    "MBPO_TARGET_ENTROPY": redq,
    "mbpo_target_entropy": redq,
    "SACNLoss": sac_n,
    "ReferenceREDQLoss": redq,
    "CQLNLoss": cql_n,
    "EDACLoss": edac,
}

__all__ = list(_MOVED)


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"torchrl_spqr.objectives.ensemble.{name} moved to {module.__name__}.{name}; the old "
        "location will be removed in the next release",
        FutureWarning,
        stacklevel=2,
    )
    return getattr(module, name)


def __dir__() -> list[str]:
    return list(__all__)
