"""The scripts' error boundary: a user-facing error becomes one line on stderr and exit code 2.

Hydra prints a (shortened) traceback for any exception that leaves a task
function. The errors the package raises for bad configs, unsafe or damaged
files and unusable datasets already name the field or file, the value and the
fix; a traceback above them only hides that line. ``run_script`` prints it
alone and exits with 2 (as ``argparse`` does for a bad argument). Ctrl-C and
SIGTERM stop the run at the end of its current step
(:mod:`torchrl_spqr.training.stop`) and end with one line saying how to resume
and exit code ``128 + signum`` (130 for SIGINT, 143 for SIGTERM, the shell's
codes): the scripts' run protocol has written the owed rows and the checkpoint
by then. In a submitit job (the ``slurm`` launcher), the scheduler's requeue signal
stops the run the same way, and submitit then requeues the job. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torchrl_spqr.training.stop import StopRequested, stop_signals

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
    """``train(*args, **kwargs)``; a user-facing error exits with its message and code 2.

    SIGINT (Ctrl-C) and SIGTERM are handled by :func:`~torchrl_spqr.training.stop.stop_signals`
    while ``train`` runs: inside a run's steps they stop it after the current step. The
    stop exits with code ``128 + signum`` (130, 143) and a line naming the signal and the
    run folder (``args[1]``, the scripts' ``train(cfg, run_dir)``) to resume, not a
    traceback. A plain ``KeyboardInterrupt`` (the handlers could not be installed outside
    the main thread) exits with 130 the same way. In a submitit job, its requeue signal stops
    the run the same way and is then handed to submitit, which requeues the job and exits
    (:func:`~torchrl_spqr.training.stop.scheduler_signal`).
    """
    try:
        with stop_signals():
            return train(*args, **kwargs)
    except user_errors() as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:
        name, code = (
            (err.name, err.exit_code) if isinstance(err, StopRequested) else ("Ctrl-C", 130)
        )
        where = f" hydra.run.dir={args[1]}" if len(args) > 1 and args[1] is not None else ""
        if isinstance(err, StopRequested) and err.forward_to is not None:
            folder = args[1] if len(args) > 1 and args[1] is not None else "its run folder"
            print(
                f"interrupted ({name}): the rows and the checkpoint are saved; the job "
                f"scheduler's handler requeues the job, which continues from {folder} "
                "if it runs with resume=true",
                file=sys.stderr,
                flush=True,
            )
            err.forward()  # submitit: checkpoint its callable, requeue, exit
            raise SystemExit(code) from None  # its handler returned (not the job's rank 0)
        print(
            f"interrupted ({name}): the rows and the checkpoint are saved; "
            f"continue with resume=true{where}",
            file=sys.stderr,
        )
        raise SystemExit(code) from None
