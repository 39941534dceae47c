"""Smoke runs of the benchmarks behind issue 19's figures, at toy sizes (no timings asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, script, *args],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_bench_min_q_prints_both_paths_and_the_default_choice():
    from torchrl_spqr.objectives.min_q import ARGMIN_MIN_MEMBERS

    n = ARGMIN_MIN_MEMBERS
    text = _run(
        "bench_min_q.py",
        *("--rounds", "1", "--inner", "1", "--threads", "1"),
        *("--hidden", "16", "--batch", "16", "--ensemble-sizes", "2", str(n)),
    )
    rows = re.findall(
        r"^\s+(float32|bfloat16)\s+(\d+)\s+1\s+([\d.]+)\s+([\d.]+)\s+[\d.]+x\s+(argmin|full)\s+"
        r"(faster|slower)$",
        text,
        re.M,
    )
    assert len(rows) == 4, text
    chosen = {(dt, int(k)): auto for dt, k, _, _, auto, _ in rows}
    assert chosen == {
        ("float32", 2): "full",
        ("float32", n): "argmin",
        ("bfloat16", 2): "full",
        ("bfloat16", n): "full",
    }


@pytest.mark.slow  # the overhead analysis runs every variant: about 18 s on 2 loaded cores
@pytest.mark.filterwarnings("ignore")
def test_bench_population_overhead_prints_the_bound_table():
    text = _run(
        "bench_population.py",
        *("--overhead", "--bf16", "--rounds", "1", "--inner", "1"),
        *("--agents", "2", "--n", "3", "--hidden", "16", "--batch", "16"),
    )
    assert "(h) fixed cost" in text
    names = ("SACNLoss(3), single agent", "population K=2")
    rows = [line for line in text.splitlines() if line.strip().startswith(names)]
    assert len(rows) == 4, text
    for line in rows:  # the measured fraction, the bound, the target
        assert re.search(r"[\d.]+%\s+[\d.]+%\s+(65|80)%", line), line


@pytest.mark.filterwarnings("ignore")
def test_bench_per_call_prints_every_case_in_the_three_variants():
    text = _run("bench_per_call.py", "--rounds", "1", "--threads", "1")
    cases = ("from_any(tensor)", "single agent, width", "single agent, 256x256", "population K = 3")
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(cases)]
    assert len(rows) == 4, text
    for row in rows:  # threads, three times, two ratios
        assert row[-6] == "1" and all(float(v) > 0 for v in row[-5:]), row


def test_the_fused_kernels_signature_is_given_once():
    """bench_per_call.py's "package" variant: the kernel's forward carries its signature
    (what inspect would parse from it), so autograd.Function.apply's binding looks it up."""
    import inspect

    from torchrl_spqr.modules.relu_mlp import _EnsembleReluMLP

    forward = _EnsembleReluMLP.forward
    given = vars(forward).pop("__signature__")
    try:
        assert inspect.signature(forward) == given  # parsed again, without it
    finally:
        forward.__signature__ = given
    assert list(given.parameters) == ["x", "num_layers", "mdtype", "params"]
