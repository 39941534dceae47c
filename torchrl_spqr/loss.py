"""Deprecated location: ``SPQRLoss`` moved to :mod:`torchrl_spqr.objectives.spqr`.

``from torchrl_spqr.loss import SPQRLoss`` still works for one release and emits a
``FutureWarning`` naming the new location; import from :mod:`torchrl_spqr.objectives`
(or ``from torchrl_spqr import SPQRLoss``).
"""

from __future__ import annotations

from torchrl_spqr._deprecation import moved_names

#: the public names that moved, and where
_MOVED = dict.fromkeys(("PAIRS", "SPQRLoss"), "torchrl_spqr.objectives.spqr")

__all__, __getattr__, __dir__ = moved_names(__name__, _MOVED)
