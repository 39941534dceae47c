"""Builders for SPQR-SAC-Ens, in TorchRL's sota-implementations layout.

The ``make_*`` functions are shared with the other scripts and live in
``torchrl_spqr.training.builders``; the loop is ``torchrl_spqr.training.online``.
"""

from torchrl_spqr.training.builders import (  # noqa: F401
    make_actor,
    make_collector,
    make_critics,
    make_environment,
    make_loss_module,
    make_optimizers,
    make_replay_buffer,
    make_target_updater,
    validate_config,
)
from torchrl_spqr.training.online import train_online as train  # noqa: F401
