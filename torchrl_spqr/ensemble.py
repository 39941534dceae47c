"""Deprecated location: the critic ensemble moved to :mod:`torchrl_spqr.modules.ensemble`.

``from torchrl_spqr.ensemble import QEnsemble`` still works for one release and emits a
``FutureWarning`` naming the new location; import from :mod:`torchrl_spqr.modules`.
"""

from __future__ import annotations

from torchrl_spqr._deprecation import moved_names

#: the public names that moved, and where
_MOVED = dict.fromkeys(
    ("INIT_SCHEMES", "BatchedMLP", "QEnsemble", "init_linear_stack_", "make_q_member"),
    "torchrl_spqr.modules.ensemble",
)

__all__, __getattr__, __dir__ = moved_names(__name__, _MOVED)
