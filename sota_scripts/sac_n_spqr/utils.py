"""Builders for sac_n_spqr, in TorchRL's sota-implementations layout.

The ``make_*`` functions are shared with the other scripts and live in
``torchrl_spqr.training.builders``; the loop is ``torchrl_spqr.training.offline``.
"""

from torchrl_spqr.training.builders import (  # noqa: F401
    make_actor,
    make_critics,
    make_loss_module,
    make_optimizers,
    make_target_updater,
    validate_config,
)
from torchrl_spqr.training.offline import make_offline_data  # noqa: F401
from torchrl_spqr.training.offline import train_offline as train  # noqa: F401
