"""``torchrl_spqr.training.stop``: SIGINT and SIGTERM wait for the end of a run's step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from torchrl_spqr.training.stop import (
    StopRequested,
    check_stop,
    keep_stop_handlers,
    scheduler_signal,
    steps_running,
    stop_requested,
    stop_signals,
    take_checkpoint_request,
    workers_ignore_stop_signals,
)


def _send(signum: int) -> None:
    """Deliver ``signum`` to this process (its Python handler runs before this returns)."""
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_outside_the_steps_a_signal_stops_where_it_lands(signum):
    with stop_signals() as installed:
        assert installed
        with pytest.raises(StopRequested) as exc:
            _send(signum)
    assert exc.value.signum == signum and exc.value.exit_code == 128 + signum
    assert isinstance(exc.value, KeyboardInterrupt)  # handled as Ctrl-C always was
    assert exc.value.name == signal.Signals(signum).name


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_inside_the_steps_a_signal_waits_for_check_stop(signum, capsys):
    done = []
    with stop_signals():
        with pytest.raises(StopRequested) as exc, steps_running():
            for step in range(5):
                if step == 2:
                    _send(signum)  # in the middle of step 2: recorded, not raised
                done.append(step)  # the rest of the step runs
                assert stop_requested() == (signum if step >= 2 else None)
                check_stop()
        assert exc.value.signum == signum
    assert done == [0, 1, 2]  # step 2 completed, step 3 never began
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name}: stopping after the current step" in err
    assert stop_requested() is None  # forgotten at the end of stop_signals


def test_handlers_are_restored_and_nesting_keeps_the_outer_ones():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_signals():
        installed = signal.getsignal(signal.SIGTERM)
        assert installed is not before[signal.SIGTERM]
        with stop_signals() as inner:
            assert inner and signal.getsignal(signal.SIGTERM) is installed
        assert signal.getsignal(signal.SIGTERM) is installed  # the inner exit kept them
    assert {s: signal.getsignal(s) for s in before} == before
    check_stop()  # nothing pending: no raise


def _library_handler(signum, frame):
    """What ``ray.init()`` installs for SIGTERM: exit wherever the signal lands."""
    sys.exit(signum)


@pytest.mark.parametrize("replaced", ["python", "c", "both"])
def test_keep_stop_handlers_puts_back_what_a_library_replaced(replaced):
    """What ray.init() does to the driver: a Python handler that exits wherever the signal
    lands (sys.exit), under it a C-level handler (here faulthandler's, which swallows the
    signal after dumping the stacks and leaves ``signal.getsignal`` unchanged; in Ray,
    absl's, which arms an abort). After the block, either is gone: a SIGTERM waits for the
    end of the step."""
    import faulthandler

    with stop_signals():
        ours = signal.getsignal(signal.SIGTERM)
        try:
            with keep_stop_handlers():
                if replaced in ("python", "both"):
                    signal.signal(signal.SIGTERM, _library_handler)
                if replaced in ("c", "both"):
                    faulthandler.register(signal.SIGTERM, file=sys.__stderr__, chain=False)
            assert signal.getsignal(signal.SIGTERM) is ours
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            with pytest.raises(StopRequested) as exc, steps_running():
                _send(signal.SIGTERM)  # neither swallowed nor SystemExit: recorded
                assert stop_requested() == signal.SIGTERM
                check_stop()
        finally:
            faulthandler.unregister(signal.SIGTERM)
    assert exc.value.signum == signal.SIGTERM


def test_keep_stop_handlers_without_stop_signals_changes_nothing():
    before = signal.getsignal(signal.SIGTERM)
    try:
        with keep_stop_handlers():
            signal.signal(signal.SIGTERM, _library_handler)
        assert signal.getsignal(signal.SIGTERM) is _library_handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_span_opens_and_closes_once():
    span = steps_running()
    with stop_signals():
        span.open()
        span.open()  # a second open does not deepen the span
        span.close()
        with pytest.raises(StopRequested):  # closed: a signal stops where it lands
            _send(signal.SIGTERM)
        span.close()  # a second close is harmless


def test_without_stop_signals_the_span_changes_nothing():
    with steps_running():
        check_stop()
        assert stop_requested() is None


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def worker():
        with stop_signals() as installed:
            seen.append(installed)

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [False] and signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_inside_the_steps_quits_at_once(tmp_path):
    """The first SIGTERM waits for the step; a second one exits with 143 right away."""
    code = textwrap.dedent(
        """
        import os, signal, sys
        from torchrl_spqr.training.stop import stop_signals, steps_running, check_stop
        with stop_signals(), steps_running():
            os.kill(os.getpid(), signal.SIGTERM)
            print("first signal recorded", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            print("not reached", flush=True)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert "first signal recorded" in res.stdout and "not reached" not in res.stdout
    assert "SIGTERM again: stopping now" in res.stderr and "Traceback" not in res.stderr


# -- inside a submitit job (Hydra's slurm and submitit_local launchers) --------------------


@pytest.fixture
def submitit_job(monkeypatch):
    """This process as a submitit job sees it: ``SUBMITIT_EXECUTOR`` set, SIGTERM logged and
    ignored, USR2 bound to a checkpoint-and-requeue handler (here one that records its calls
    with what was pending then, and returns)."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    calls = {"bypass": [], "requeue": []}

    def bypass(signum, frame):
        calls["bypass"].append(signum)

    def requeue(signum, frame):
        calls["requeue"].append((signum, stop_requested()))

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    signal.signal(signal.SIGTERM, bypass)
    signal.signal(signal.SIGUSR2, requeue)
    try:
        yield calls, bypass, requeue
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_scheduler_signal_is_submitits_requeue_signal(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert scheduler_signal() is None
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert scheduler_signal() == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert scheduler_signal() == signal.SIGUSR1


def test_in_a_submitit_job_the_requeue_signal_waits_for_the_step_then_is_forwarded(
    submitit_job, capsys
):
    calls, bypass, requeue = submitit_job
    done = []
    with stop_signals():
        with pytest.raises(StopRequested) as exc, steps_running():
            for step in range(5):
                if step == 1:
                    _send(signal.SIGUSR2)  # the requeue signal: deferred, not handled yet
                    assert calls["requeue"] == []
                done.append(step)
                check_stop()
        assert exc.value.signum == signal.SIGUSR2 and exc.value.forward_to is requeue
    assert done == [0, 1]
    assert signal.getsignal(signal.SIGUSR2) is requeue  # submitit's handler is back
    assert exc.value.forward() and calls["requeue"] == [(signal.SIGUSR2, None)]
    assert "SIGUSR2 (the job scheduler's preemption/timeout signal)" in capsys.readouterr().err


def test_in_a_submitit_job_sigterm_asks_for_a_checkpoint_and_the_run_goes_on(submitit_job, capsys):
    """SIGTERM (a preemption or a cancel; the kill follows a grace period later): submitit's
    handler still sees it, nothing stops, and the step's end checkpoints once."""
    calls, bypass, requeue = submitit_job
    done = []
    with stop_signals():
        with steps_running():
            for step in range(4):
                if step == 1:
                    _send(signal.SIGTERM)
                    _send(signal.SIGTERM)  # not a "second signal": no exit
                done.append((step, take_checkpoint_request()))
                check_stop()
        assert calls["bypass"] == [signal.SIGTERM, signal.SIGTERM]
        _send(signal.SIGTERM)  # outside the steps: submitit's handler only
        assert calls["bypass"] == [signal.SIGTERM] * 3 and not take_checkpoint_request()
    assert done == [(0, False), (1, True), (2, False), (3, False)]
    err = capsys.readouterr().err
    assert err.count("SIGTERM in a submitit job: checkpointing after the current step") == 1
    assert signal.getsignal(signal.SIGTERM) is bypass


def test_in_a_submitit_job_workers_ignore_the_requeue_signal_too(submitit_job):
    with stop_signals():
        with workers_ignore_stop_signals():
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
                assert signal.getsignal(s) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR2) is not signal.SIG_IGN


def test_the_requeue_signal_wins_over_a_pending_sigint(submitit_job):
    """A preemption after a Ctrl-C: the job is requeued (not ended), after the same step;
    the requeue signal does not count as the second signal that quits at once."""
    calls, _, requeue = submitit_job
    with stop_signals(), pytest.raises(StopRequested) as exc, steps_running():
        _send(signal.SIGINT)
        _send(signal.SIGUSR2)
        assert stop_requested() == signal.SIGUSR2
        check_stop()
    assert exc.value.forward_to is requeue


def test_outside_the_steps_the_requeue_signal_is_forwarded_by_the_caller(submitit_job):
    calls, _, requeue = submitit_job
    with stop_signals(), pytest.raises(StopRequested) as exc:
        _send(signal.SIGUSR2)
    assert calls["requeue"] == [] and exc.value.forward_to is requeue


def test_outside_a_submitit_job_usr2_and_stop_requests_are_not_forwarded(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    before = signal.getsignal(signal.SIGUSR2)
    with stop_signals():
        assert signal.getsignal(signal.SIGUSR2) is before
        with pytest.raises(StopRequested) as exc:
            _send(signal.SIGTERM)
    assert exc.value.forward_to is None and not exc.value.forward()


def test_the_wandb_logger_keeps_the_stop_handlers(tmp_path, monkeypatch):
    """``logger.backend=wandb`` starts a wandb run (a service process beside the script)
    while the stop handlers are installed. Unlike ``ray.init()`` it must leave them in place,
    the C-level one included: a SIGTERM during the steps is recorded, not an exit. Checked
    with wandb 0.31 (not a dependency; skipped where it is not installed)."""
    pytest.importorskip("wandb")
    from omegaconf import OmegaConf

    from torchrl_spqr.training.loggers import make_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.create({"logger": {"backend": "wandb", "wandb_mode": "offline"}})
    with stop_signals():
        ours = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        logger = make_logger(cfg, tmp_path / "run")
        try:
            logger.log_scalar("x", 1.0, step=0)
            assert {s: signal.getsignal(s) for s in ours} == ours
            with pytest.raises(StopRequested) as exc, steps_running():
                _send(signal.SIGTERM)  # through the C-level handler to ours: recorded
                assert stop_requested() == signal.SIGTERM
                check_stop()
        finally:
            logger.experiment.finish()
    assert exc.value.signum == signal.SIGTERM
