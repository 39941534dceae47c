"""Training utilities behind the SOTA-style scripts: config, builders, checkpoints and the run
protocol (``common.RunContext``); each script in ``sota_scripts/`` holds its own loop.
"""

from torchrl_spqr.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from torchrl_spqr.training.config import ConfigError, resolve_config, validate_config

__all__ = [
    "CheckpointError",
    "ConfigError",
    "load_checkpoint",
    "resolve_config",
    "save_checkpoint",
    "validate_config",
]
