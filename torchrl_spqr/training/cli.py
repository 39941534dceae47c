"""The scripts' error boundary: a user-facing error becomes one line on stderr and exit code 2.

Hydra prints a (shortened) traceback for any exception that leaves a task
function. The errors the package raises for bad configs, unsafe or damaged
files and unusable datasets already name the field or file, the value and the
fix; a traceback above them only hides that line. ``run_script`` prints it
alone and exits with 2 (as ``argparse`` does for a bad argument). Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["run_script", "user_errors"]


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message is meant for the user, not a traceback."""
    from torchrl_spqr.data import DatasetCorruptedError, DatasetUnavailableError
    from torchrl_spqr.safe_io import CorruptFileError, UnsafeFileError
    from torchrl_spqr.training.builders import ConfigError
    from torchrl_spqr.training.checkpoint import CheckpointError

    return (
        ConfigError,
        CheckpointError,
        UnsafeFileError,
        CorruptFileError,
        DatasetCorruptedError,
        DatasetUnavailableError,
    )


def run_script(train: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``train(*args, **kwargs)``; a user-facing error exits with its message and code 2."""
    try:
        return train(*args, **kwargs)
    except user_errors() as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
