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
    steps_running,
    stop_requested,
    stop_signals,
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
