"""Builders of SPQR-SAC-N, in TorchRL's sota-implementations layout.

The ``make_*`` builders are shared with the other scripts (``torchrl_spqr.training.builders``,
``torchrl_spqr.training.offline`` for the dataset); the run's protocol (logs, owed rows,
checkpoints, resume) is ``torchrl_spqr.training.common.RunContext``. The update and the
loop are in sac_n_spqr.py.
"""

from torchrl_spqr.analysis import learning_curves_at_exit
from torchrl_spqr.training.builders import (
    make_actor,
    make_critics,
    make_environment,
    make_loss_module,
    make_optimizers,
    make_target_updater,
)
from torchrl_spqr.training.common import (
    RunContext,
    cuda_graph_update,
    evaluate_policy,
    prepare_run,
)
from torchrl_spqr.training.offline import make_offline_data, record_dataset_transform

__all__ = [
    "RunContext",
    "cuda_graph_update",
    "evaluate_policy",
    "learning_curves_at_exit",
    "make_actor",
    "make_critics",
    "make_environment",
    "make_loss_module",
    "make_offline_data",
    "make_optimizers",
    "make_target_updater",
    "prepare_run",
    "record_dataset_transform",
]
