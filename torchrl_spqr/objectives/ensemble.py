"""Deprecated location: the ensemble losses moved to one module each.

``SACNLoss`` to :mod:`torchrl_spqr.objectives.sac_n`, ``ReferenceREDQLoss`` and the MBPO
target entropies to :mod:`torchrl_spqr.objectives.redq`, ``EDACLoss`` to
:mod:`torchrl_spqr.objectives.edac`, ``CQLNLoss`` to :mod:`torchrl_spqr.objectives.cql_n`.
The old imports still work for one release and emit a ``FutureWarning`` naming the new
location; import from :mod:`torchrl_spqr.objectives`.
"""

from __future__ import annotations

from torchrl_spqr._deprecation import moved_names

#: each moved public name and the module that holds it now
_MOVED = {
    "MBPO_TARGET_ENTROPY": "torchrl_spqr.objectives.redq",
    "mbpo_target_entropy": "torchrl_spqr.objectives.redq",
    "SACNLoss": "torchrl_spqr.objectives.sac_n",
    "ReferenceREDQLoss": "torchrl_spqr.objectives.redq",
    "CQLNLoss": "torchrl_spqr.objectives.cql_n",
    "EDACLoss": "torchrl_spqr.objectives.edac",
}

__all__, __getattr__, __dir__ = moved_names(__name__, _MOVED)
