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

**Inside a submitit job** (Hydra's ``slurm`` and ``submitit_local`` launchers), submitit
handles the scheduler's signals itself: it logs and ignores SIGTERM (SLURM sends it on a
preemption or a cancel, and kills the job a grace period later), and on its requeue signal
(``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default; SLURM sends it ``signal_delay_s`` before the
time limit, and on a preemption where the cluster is set up so) it checkpoints the job's
callable, requeues the job and exits, wherever the signal landed. :func:`stop_signals`
keeps that contract and moves both to a step boundary:

- **SIGTERM** still does not stop the run (submitit's handler still logs it), but the
  run writes a checkpoint at the end of the current step (:func:`take_checkpoint_request`)
  and goes on: if the kill follows, the job loses only the steps after that checkpoint.
- **The requeue signal** waits like a stop signal: the step completes, the exit checkpoint
  is written, and :meth:`StopRequested.forward` then hands it to submitit's handler, which
  requeues the job (``run_script`` does this). The requeued job continues from that
  checkpoint when it runs with ``resume=true``. It wins over a pending SIGINT (it does not
  count as a second signal).

Code that installs its own handlers while a run starts is run inside
:func:`keep_stop_handlers`, which puts the stop handlers back afterwards: ``ray.init()``
(the Ray collector backend) replaces the SIGTERM handler with one that raises
``SystemExit`` wherever the signal lands (and Ray's C++ core adds a failure-signal handler
that aborts the process 3 s later), so without it a SIGTERM would cut a Ray run's update
in half.

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
    "keep_stop_handlers",
    "scheduler_signal",
    "steps_running",
    "stop_requested",
    "stop_signals",
    "take_checkpoint_request",
    "workers_ignore_stop_signals",
]

#: The signals :func:`stop_signals` handles outside a submitit job (see :func:`scheduler_signal`).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def scheduler_signal() -> int | None:
    """The signal a job scheduler's own Python handler acts on, to be deferred to a step
    boundary and then handed to that handler: inside a submitit job, its preemption and
    timeout signal (``SIG`` + ``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default); else ``None``."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    return None if signum is None else int(signum)


class StopRequested(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, or a scheduler's requeue signal), raised at a step
    boundary or outside the steps.

    ``signum`` is the signal's number; ``exit_code`` is ``128 + signum``. ``forward_to`` is
    the handler the signal was taken from when :func:`stop_signals` deferred a scheduler's
    signal (submitit's checkpoint-and-requeue), else ``None``: call :meth:`forward` once the
    run has stopped.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.forward_to = _State.forward.get(self.signum)
        super().__init__(f"{signal.Signals(self.signum).name} received")

    def forward(self) -> bool:
        """Hand the signal to the handler it was taken from (submitit then requeues the job
        and exits); returns whether there was one. Call it after the run has stopped."""
        if self.forward_to is None:
            return False
        self.forward_to(self.signum, None)
        return True

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
    handled: tuple[int, ...] = ()  # the signals whose handler is _handle
    forward: dict = {}  # deferred scheduler signal -> the handler it was taken from
    save_only: dict = {}  # SIGTERM in a submitit job -> submitit's handler (or None)
    save = False  # a checkpoint is asked for at the end of the current step


def _handle(signum: int, frame) -> None:
    if signum in _State.save_only:  # SIGTERM in a submitit job: save, do not stop
        passed = _State.save_only[signum]
        if callable(passed):
            passed(signum, frame)  # submitit logs that it ignores it
        if _State.depth > 0 and not _State.save:
            _State.save = True
            print(
                f"\n{signal.Signals(signum).name} in a submitit job: checkpointing after the "
                "current step and going on (submitit ignores it; its requeue signal stops "
                "the run)",
                file=sys.stderr,
                flush=True,
            )
        return
    if _State.depth == 0:  # nothing is half-done here: stop where it landed
        raise StopRequested(signum)
    name = signal.Signals(signum).name
    if signum in _State.forward and _State.pending not in _State.forward:
        # the scheduler's requeue signal: never "a second signal", and it wins over a
        # pending SIGINT (the job is requeued rather than ended)
        _State.pending = signum
        print(
            f"\n{name} (the job scheduler's preemption/timeout signal): stopping after the "
            "current step (its row and the checkpoint are written first), then handing the "
            "signal to the scheduler's handler to requeue the job",
            file=sys.stderr,
            flush=True,
        )
        return
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


def _managing() -> bool:
    """Whether :func:`stop_signals` is active and this is the main thread: the condition
    under which the helpers that change handlers for it act (elsewhere they change nothing)."""
    return _State.installed and threading.current_thread() is threading.main_thread()


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
    handled = [signal.SIGINT, signal.SIGTERM]
    forward, save_only = {}, {}
    requeue = scheduler_signal()
    if requeue is not None:  # a submitit job: keep its contract (module docstring)
        save_only[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
        if callable(signal.getsignal(requeue)):  # submitit's checkpoint-and-requeue handler
            forward[requeue] = signal.getsignal(requeue)
            handled.append(requeue)
    old = _set_handlers(dict.fromkeys(handled, _handle))
    _reset(True, tuple(int(s) for s in handled), forward, save_only)
    try:
        yield True
    finally:
        _set_handlers(old)
        _reset(False)


def _reset(installed: bool, handled: tuple = (), forward=None, save_only=None) -> None:
    _State.installed, _State.pending, _State.depth, _State.save = installed, None, 0, False
    _State.handled, _State.forward, _State.save_only = handled, forward or {}, save_only or {}


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


def take_checkpoint_request() -> bool:
    """Whether a checkpoint was asked for since the last call (SIGTERM in a submitit job);
    the run protocol calls it at the end of each step and checkpoints if so."""
    asked, _State.save = _State.save, False
    return asked


def check_stop() -> None:
    """Raise :class:`StopRequested` if a stop signal arrived (call it between steps)."""
    if _State.pending is not None:
        raise StopRequested(_State.pending)


@contextmanager
def workers_ignore_stop_signals() -> Iterator[None]:
    """Start worker processes inside this block: they inherit SIGINT and SIGTERM ignored
    (and, in a submitit job, its requeue signal, which a scheduler may send to every
    process of the job).

    Only while :func:`stop_signals` is active (else it changes nothing): the main process
    then stops the run at a step boundary and shuts its workers down. A worker whose main
    process died finds its pipe closed and exits. The main process ignores these signals for
    the short time the block takes (starting the processes).
    """
    if not _managing():
        yield
        return
    ignored = set(STOP_SIGNALS) | set(_State.handled)
    old = _set_handlers(dict.fromkeys(ignored, signal.SIG_IGN))
    try:
        yield
    finally:
        _set_handlers(old)


@contextmanager
def keep_stop_handlers() -> Iterator[None]:
    """Run code that may replace the stop handlers (``ray.init()``) and put them back after.

    Only while :func:`stop_signals` is active and in the main thread (else it changes
    nothing). At exit, every signal :func:`stop_signals` handles gets its stop handler
    again, whether the block replaced the Python handler (Ray's ``sys.exit``) or only the
    process's C-level one (absl's failure-signal handler in Ray's core):
    ``signal.signal`` always sets both. A signal that arrives inside the block meets
    whatever handler is installed then.
    """
    if not _managing():
        yield
        return
    ours = {s: signal.getsignal(s) for s in _State.handled}
    try:
        yield
    finally:
        _set_handlers(ours)
