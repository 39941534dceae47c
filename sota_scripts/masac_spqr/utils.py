"""Builders for SPQR-MASAC, in TorchRL's sota-implementations layout.

The ``make_*`` functions and the training loop live in ``torchrl_spqr.multiagent``.
"""

from torchrl_spqr.multiagent import (  # noqa: F401
    evaluate,
    expand_done_to_agents,
    make_actor,
    make_collector,
    make_critics,
    make_environment,
    make_loss_module,
    make_optimizers,
    make_replay_buffer,
    validate_config,
)
from torchrl_spqr.multiagent import train_masac as train  # noqa: F401
