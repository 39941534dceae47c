"""Stopping a run at a step boundary: Ctrl-C (SIGINT) and SIGTERM never cut an update in half.

Python raises ``KeyboardInterrupt`` wherever Ctrl-C lands, possibly inside an optimiser
step or inside the functional-call module swap of a loss, and SIGTERM (what a scheduler
such as SLURM sends before it kills a job) ends the process at once by default, losing
everything since the last periodic checkpoint. :func:`stop_signals` installs one handler
for both, and the run protocol (:class:`~torchrl_spqr.training.common.RunContext`, the
population's :class:`~torchrl_spqr.training.population.PopulationRun`) marks the span in
which a signal must wait (:func:`steps_running`, from ``with run:`` to its exit):

- **Inside a run's steps**, the first signal is recorded and a line says so; the run
  finishes the step it is in (its updates, the row due, the checkpoint due) and
  ``run.end_step()`` raises :class:`StopRequested` (:func:`check_stop`). Leaving
  ``with run:`` writes the exit checkpoint and the row owed, as it does for any exit.
- **A second signal** there quits at once (exit status ``128 + signum``): the last
  checkpoint and every row written so far are complete on disk (both are written
  atomically), so ``resume=true`` continues from there.
- **Outside the steps** (building the agent, loading a dataset, plotting), a signal raises
  :class:`StopRequested` where it lands, as Ctrl-C always did: nothing there is half-updated.

:class:`StopRequested` is a ``KeyboardInterrupt``, so code that handles Ctrl-C handles a
SIGTERM stop the same way. The scripts' :func:`~torchrl_spqr.training.cli.run_script`
turns it into one line naming the run folder to resume and the exit status ``128 +
signum`` (130 for Ctrl-C, 143 for SIGTERM), the shell's convention.

Worker processes (TorchRL's multi-process collectors, a population's ``ParallelEnv``) are
started inside :func:`workers_ignore_stop_signals`: they ignore both signals, so a Ctrl-C
at the terminal (sent to the whole process group) or a scheduler's SIGTERM to every process
of a job reaches the main process only; it finishes its step and shuts the workers down,
instead of waiting for a batch from a worker that died.

Handlers can only be installed from the main thread; elsewhere :func:`stop_signals` leaves
the process's handlers as they are (and a run then stops as Python's defaults say).

Example::

    >>> from torchrl_spqr.training.stop import stop_signals, steps_running, check_stop
    >>> with stop_signals():
    ...     with steps_running():
    ...         for step in range(3):
    ...             pass  # one step: collect, update, log
    ...             check_stop()  # raises StopRequested after a SIGINT or SIGTERM
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "StopRequested",
    "check_stop",
    "steps_running",
    "stop_requested",
    "stop_signals",
    "workers_ignore_stop_signals",
]

#: The signals :func:`stop_signals` handles.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """A stop signal (SIGINT or SIGTERM), raised at a step boundary or outside the steps.

    ``signum`` is the signal's number; ``exit_code`` is ``128 + signum``.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"{signal.Signals(self.signum).name} received")

    @property
    def name(self) -> str:
        """The signal's name, e.g. ``"SIGTERM"``."""
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """``128 + signum``: the shell's status for a process ended by that signal."""
        return 128 + self.signum


class _State:
    """What the handler knows: whether it is installed, the pending signal, the depth of
    nested :func:`steps_running` spans."""

    installed = False
    pending: int | None = None
    depth = 0


def _handle(signum: int, frame) -> None:
    if _State.depth == 0:  # nothing is half-done here: stop where it landed
        raise StopRequested(signum)
    name = signal.Signals(signum).name
    if _State.pending is not None:
        print(
            f"\n{name} again: stopping now; the run folder keeps its last checkpoint "
            "(continue with resume=true)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)
    _State.pending = signum
    print(
        f"\n{name}: stopping after the current step (its row and the checkpoint are written "
        "first); send it again to quit at once",
        file=sys.stderr,
        flush=True,
    )


def _set_handlers(handlers: dict) -> dict:
    """Install ``{signal: handler}``; returns the handlers they replace, to restore them."""
    old = {s: signal.getsignal(s) for s in handlers}
    for s, handler in handlers.items():
        signal.signal(s, handler)
    return old


@contextmanager
def stop_signals() -> Iterator[bool]:
    """Handle SIGINT and SIGTERM as stop requests while the block runs; yields whether the
    handlers were installed (only the main thread can install them).

    The previous handlers are restored at exit, and a pending request is forgotten.
    Nested uses (a script calling another's ``train``) keep the outer handlers.
    """
    if _State.installed or threading.current_thread() is not threading.main_thread():
        yield _State.installed
        return
    old = _set_handlers(dict.fromkeys(STOP_SIGNALS, _handle))
    _State.installed, _State.pending, _State.depth = True, None, 0
    try:
        yield True
    finally:
        _set_handlers(old)
        _State.installed, _State.pending, _State.depth = False, None, 0


class steps_running:  # noqa: N801 (a context manager, named as torch.no_grad)
    """The span in which a stop signal waits for :func:`check_stop` (a run's ``with run:``).

    A context manager; :meth:`open` and :meth:`close` do the same for a protocol object that
    opens the span in its ``__enter__`` and closes it in its ``close`` (each at most once).
    Without :func:`stop_signals` around it, it changes nothing.
    """

    def __init__(self) -> None:
        self._open = False

    def open(self) -> None:
        """Start the span (a second call does nothing)."""
        if not self._open:
            _State.depth += 1
            self._open = True

    def close(self) -> None:
        """End the span (a second call does nothing)."""
        if self._open:
            _State.depth = max(0, _State.depth - 1)
            self._open = False

    def __enter__(self) -> steps_running:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_requested() -> int | None:
    """The number of the stop signal received and not yet acted on, or ``None``."""
    return _State.pending


def check_stop() -> None:
    """Raise :class:`StopRequested` if a stop signal arrived (call it between steps)."""
    if _State.pending is not None:
        raise StopRequested(_State.pending)


@contextmanager
def workers_ignore_stop_signals() -> Iterator[None]:
    """Start worker processes inside this block: they inherit SIGINT and SIGTERM ignored.

    Only while :func:`stop_signals` is active (else it changes nothing): the main process
    then stops the run at a step boundary and shuts its workers down. A worker whose main
    process died finds its pipe closed and exits. The main process ignores both signals for
    the short time the block takes (starting the processes).
    """
    if not _State.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = _set_handlers(dict.fromkeys(STOP_SIGNALS, signal.SIG_IGN))
    try:
        yield
    finally:
        _set_handlers(old)
