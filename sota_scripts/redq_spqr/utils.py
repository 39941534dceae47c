"""Builders of SPQR-REDQ, in TorchRL's sota-implementations layout.

The ``make_*`` builders are shared with the other scripts (``torchrl_spqr.training.builders``);
the run's protocol (logs, owed rows, checkpoints, resume) is
``torchrl_spqr.training.common.RunContext``. The update and the loop are in redq_spqr.py.
"""

from torchrl_spqr.analysis import learning_curves_at_exit
from torchrl_spqr.training.builders import (
    make_actor,
    make_collector,
    make_critics,
    make_environment,
    make_loss_module,
    make_optimizers,
    make_replay_buffer,
    make_target_updater,
    shutdown_collector,
)
from torchrl_spqr.training.common import (
    RunContext,
    cuda_graph_update,
    evaluate_policy,
    prepare_run,
)

__all__ = [
    "RunContext",
    "cuda_graph_update",
    "evaluate_policy",
    "learning_curves_at_exit",
    "make_actor",
    "make_collector",
    "make_critics",
    "make_environment",
    "make_loss_module",
    "make_optimizers",
    "make_replay_buffer",
    "make_target_updater",
    "prepare_run",
    "shutdown_collector",
]
