"""Builders for SPQR-MASAC, in TorchRL's sota-implementations layout.

The multi-agent ``make_*`` functions (VMAS environment, per-agent policy, the
ensemble of multi-agent critics, SACLoss on the agent group wrapped in SPQR)
live in ``torchrl_spqr.training.multiagent``; the optimisers, replay buffer and
target updater are the single-agent scripts' builders. The loop and the update
are in ``masac_spqr.py``.
"""

from torchrl_spqr.training.builders import get_device  # noqa: F401
from torchrl_spqr.training.multiagent import (  # noqa: F401
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
    validate_config,
)
