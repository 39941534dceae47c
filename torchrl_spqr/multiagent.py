"""Deprecated location of the multi-agent (MASAC) pieces; removed in the next release.

- the critic member :class:`MultiAgentQNet` and ``GROUP``: :mod:`torchrl_spqr.modules.multiagent`;
- the builders (``make_environment``, ``make_actor``, ``make_critics``, ``make_loss_module``,
  ``make_optimizers``, ``make_replay_buffer``, ``make_collector``, ``evaluate``,
  ``expand_done_to_agents``, ``validate_config``): :mod:`torchrl_spqr.training.multiagent`;
- the training loop (formerly ``train_masac``): ``train(cfg, run_dir)`` in the script
  ``sota_scripts/masac_spqr/masac_spqr.py``.

Each moved name still resolves here, with a ``FutureWarning`` naming its new location.
"""

from __future__ import annotations

from torchrl_spqr._deprecation import moved_names

_MODULES = "torchrl_spqr.modules.multiagent"
_TRAINING = "torchrl_spqr.training.multiagent"

#: moved public name -> its new module
_MOVED = {
    "GROUP": _MODULES,
    "MultiAgentQNet": _MODULES,
    "expand_done_to_agents": _TRAINING,
    "validate_config": _TRAINING,
    "make_environment": _TRAINING,
    "make_actor": _TRAINING,
    "make_critics": _TRAINING,
    "make_loss_module": _TRAINING,
    "make_optimizers": _TRAINING,
    "make_replay_buffer": _TRAINING,
    "make_collector": _TRAINING,
    "evaluate": _TRAINING,
}
#: names removed for good
_REMOVED = {
    "train_masac": "torchrl_spqr.multiagent.train_masac was removed: the MASAC training loop is "
    "train(cfg, run_dir) in the script sota_scripts/masac_spqr/masac_spqr.py "
    "(run: python sota_scripts/masac_spqr/masac_spqr.py).",
}

__all__, __getattr__, __dir__ = moved_names(__name__, _MOVED, _REMOVED)
