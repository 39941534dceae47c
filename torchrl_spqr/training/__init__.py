"""Training utilities behind the SOTA-style scripts: builders, checkpoints, the online loop."""

from torchrl_spqr.training.builders import ConfigError, validate_config
from torchrl_spqr.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = [
    "CheckpointError",
    "ConfigError",
    "load_checkpoint",
    "save_checkpoint",
    "validate_config",
]
