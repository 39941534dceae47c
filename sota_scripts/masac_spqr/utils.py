"""Builders of SPQR-MASAC, in TorchRL's sota-implementations layout.

The multi-agent ``make_*`` builders (VMAS environment, per-agent policy, the ensemble of
multi-agent critics, SACLoss on the agent group wrapped in SPQR) are
``torchrl_spqr.training.multiagent``; the optimisers, replay buffer, target updater and
collector are the single-agent scripts' builders. The run's protocol (logs, owed rows,
checkpoints, resume) is ``torchrl_spqr.training.common.RunContext``. The update and the
loop are in masac_spqr.py.
"""

from torchrl_spqr.analysis import learning_curves_at_exit
from torchrl_spqr.training.builders import get_device, shutdown_collector
from torchrl_spqr.training.common import RunContext, open_run_folder
from torchrl_spqr.training.config import resolve_config
from torchrl_spqr.training.multiagent import (
    GROUP,
    evaluate,
    expand_done_to_agents,
    make_actor,
    make_collector,
    make_critics,
    make_environment,
    make_loss_module,
    make_optimizers,
    make_replay_buffer,
    make_target_updater,
)

__all__ = [
    "GROUP",
    "RunContext",
    "evaluate",
    "expand_done_to_agents",
    "get_device",
    "learning_curves_at_exit",
    "make_actor",
    "make_collector",
    "make_critics",
    "make_environment",
    "make_loss_module",
    "make_optimizers",
    "make_replay_buffer",
    "make_target_updater",
    "open_run_folder",
    "resolve_config",
    "shutdown_collector",
]
