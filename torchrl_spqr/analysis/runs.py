"""Run folders: reading ``metrics.csv``, finding the runs of a sweep, grouping them by arm.

Every path is either a run folder (it holds ``metrics.csv``) or a folder searched
recursively for run folders (a Hydra multirun folder, ``benchmarks/learning/...``).
Runs whose paths differ only by the seed part (``seed3``, ``_seed3``, ``seed=3``)
form one group ("arm"); the group label is the run's path relative to the common
parent of the arguments, seed part removed, or with ``pool=True`` relative to the
argument the run was found under (the same arm in several folders pools their seeds).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "SEED_RE",
    "check_run",
    "find_runs",
    "group_name",
    "group_runs",
    "is_run",
    "read_metrics",
    "run_outcome",
    "runs_by_seed",
    "seed_of",
    "series",
    "step_key",
    "strip_seed",
]

#: The seed part of a run folder's name.
SEED_RE = re.compile(r"([_,\-]?seed[=_\-]?(?P<seed>\d+))", re.IGNORECASE)

#: A run folder as given to :func:`runs_by_seed` (``Path`` or ``str``).
RunT = TypeVar("RunT", Path, str)


def read_metrics(run_dir: str | Path, until: float | None = None) -> list[dict[str, float]]:
    """Rows of ``metrics.csv`` with numeric values (empty cells dropped).

    ``until``: only the rows logged at or before that step (environment steps, or
    gradient updates for runs that log no environment steps; see :func:`step_key`),
    to compare runs at a common budget. A row without a step is then dropped too.
    """
    rows = _read_rows(Path(run_dir))
    return rows if until is None else _rows_until(rows, until)


def _rows_until(rows: list[dict[str, float]], until: float) -> list[dict[str, float]]:
    """The rows logged at or before step ``until`` (rows without a step dropped)."""
    step = step_key(rows)
    return [r for r in rows if r.get(step, math.inf) <= until]


def _read_rows(run_dir: Path) -> list[dict[str, float]]:
    rows = []
    with (run_dir / "metrics.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                if k is None or v in ("", None):
                    continue
                try:
                    row[k] = float(v)
                except ValueError:
                    continue
            rows.append(row)
    return rows


def step_key(rows: list[dict[str, float]]) -> str:
    """The x axis of a run: ``"frames"`` if it logged environment steps, else ``"updates"``."""
    return "frames" if any(r.get("frames", 0) > 0 for r in rows) else "updates"


def series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key`` over the rows that logged it with a finite value."""
    step = step_key(rows)
    pts = [(r[step], r[key]) for r in rows if key in r and step in r and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def run_outcome(rows, key: str) -> dict[str, Any] | None:
    """Final and best ``key`` of one run, NaN-aware; ``None`` if the run never logged ``key``.

    ``final`` is the value of the last row that logged ``key`` (its step: ``final_step``):
    NaN when that value is not finite (NaN or +-inf), never an earlier finite value.
    ``diverged_at`` is then the step from which every logged value is non-finite (else
    None). ``best`` is the maximum over the finite values (NaN if there are none);
    ``nonfinite`` counts the non-finite values logged anywhere in the run.
    """
    step = step_key(rows)
    pts = [(r.get(step, math.nan), r[key]) for r in rows if key in r]
    if not pts:
        return None
    finite = [v for _, v in pts if math.isfinite(v)]
    final_step, final = pts[-1]
    diverged_at = None
    if not math.isfinite(final):
        i = len(pts) - 1
        while i > 0 and not math.isfinite(pts[i - 1][1]):
            i -= 1
        diverged_at, final = pts[i][0], math.nan
    return {
        "final": final,
        "final_step": final_step,
        "best": max(finite) if finite else math.nan,
        "diverged_at": diverged_at,
        "nonfinite": len(pts) - len(finite),
        "logged": len(pts),
    }


def check_run(
    run_dir: str | Path, key: str, until: float | None = None
) -> tuple[str | None, str | None]:
    """``(reason to skip the run, warning)`` for ``key``; both None for a sound run.

    Skipped: an unreadable, empty or header-only ``metrics.csv``, or one that never
    logged ``key``; with ``until`` (compare at that step, see :func:`read_metrics`), also a
    run that stopped before it, or logged no ``key`` up to it. Warned about (kept, its
    final reported as NaN): a run whose last ``key`` is NaN / inf, or whose ``key`` is never
    finite (up to ``until``).
    """
    path = Path(run_dir) / "metrics.csv"
    try:
        if path.stat().st_size == 0:
            return "metrics.csv is empty (the run stopped before writing its header)", None
        rows = read_metrics(run_dir)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        return f"metrics.csv cannot be read ({err})", None
    if not rows:
        return "metrics.csv has a header but no rows (the run stopped before its first log)", None
    step = step_key(rows)
    upto = ""
    if until is not None:
        last = max((r[step] for r in rows if step in r), default=None)
        if last is None or last < until:
            at = "no step" if last is None else f"{step} {last:g}"
            return f"it stopped before {step} {until:g} (its last row: {at})", None
        rows = _rows_until(rows, until)
        upto = f" up to {step} {until:g}"
    out = run_outcome(rows, key)
    if out is None:
        return f"no {key} logged in its {len(rows)} rows{upto}", None
    if out["logged"] == out["nonfinite"]:
        return None, (
            f"all {out['logged']} values of {key} are NaN/inf (diverged at {step} "
            f"{out['diverged_at']:g}): final and best reported as NaN, no curve drawn"
        )
    if out["diverged_at"] is not None:
        return None, (
            f"{key} is NaN/inf from {step} {out['diverged_at']:g} on (diverged): final reported "
            "as NaN, the curve stops at the last finite value"
        )
    return None, None


def strip_seed(name: str) -> str:
    """``name`` without its seed part (``seed3``, ``_seed3``, ``seed=3``)."""
    return SEED_RE.sub("", name).strip("_,-= ")


def group_name(run_dir: str | Path) -> str:
    """Runs that differ only by seed share a group: the folder name without ``seed<k>``."""
    name = Path(run_dir).name
    return strip_seed(name) or name


def _hydra_overrides_name(run_dir: Path) -> str | None:
    """``key=value,...`` of a Hydra run's ``.hydra/overrides.yaml``, seed and hydra.* left out."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return None
    items = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line.startswith("- "):
            continue
        item = line[2:].strip().strip("'\"")
        key = item.split("=", 1)[0].lstrip("+~")
        if key == "seed" or key.startswith("hydra."):
            continue
        items.append(item)
    return ",".join(items)


def _arm_of(run_dir: Path, base: Path) -> str:
    try:
        rel = run_dir.relative_to(base)
    except ValueError:
        rel = Path(run_dir.name)
    parts = [strip_seed(p) for p in rel.parts] or [group_name(run_dir)]
    if parts and (parts[-1] == "" or parts[-1].isdigit()):
        hydra = _hydra_overrides_name(run_dir)
        if hydra is not None:  # Hydra's numbered multirun subfolders
            parts[-1] = hydra or "default"
    parts = [p for p in parts if p]
    return "/".join(parts) or group_name(run_dir)


def is_run(path: Path) -> bool:
    """Whether ``path`` is a run folder (it holds ``metrics.csv``)."""
    return (path / "metrics.csv").is_file()


def find_runs(paths, *, pool: bool = False) -> list[tuple[Path, str]]:
    """Run folders under ``paths`` (each a run folder or a folder searched recursively).

    Returns ``(run_dir, arm)`` pairs sorted by arm, then (``pool``) the order of ``paths``,
    then path; the arm is the run's
    path relative to the common parent of ``paths`` with the seed part removed.
    Symbolic links to folders are followed (a comparison folder may link run folders
    from several sweeps; the arm then comes from the link's name), each folder once.

    ``pool=True``: the arm is the run's path relative to the path it was found under
    (for a run folder given itself: its name), so runs of the same arm in several
    folders (``old/arms/beta0.0_N10_seed0`` and ``new/arms/beta0.0_N10_seed3``) form one
    arm with the seeds of both, in the order of ``paths``. An arm that would then hold two
    runs of one seed is refused (:func:`runs_by_seed`'s ``ValueError``).
    """
    roots = [Path(p) for p in paths]
    runs: list[tuple[Path, int]] = []  # (run folder, index of the path it was found under)
    bases: list[Path] = []  # each path's folder that arms are named from
    for i, root in enumerate(roots):
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist.")
        bases.append(Path(os.path.abspath(root.parent if is_run(root) else root)))
        if is_run(root):
            runs.append((root, i))
            continue
        found = sorted(_run_folders_under(root))
        if not found:
            raise FileNotFoundError(f"No run folder (holding metrics.csv) under {root}.")
        runs.extend((r, i) for r in found)
    common = Path(os.path.commonpath([str(b) for b in bases]))
    seen, found_in, out = set(), {}, []
    for r, i in runs:
        key = r.resolve()
        if key not in seen:
            seen.add(key)
            found_in[r] = i
            out.append((r, _arm_of(Path(os.path.abspath(r)), bases[i] if pool else common)))
    # pooled arms keep the order of the paths given (``old/arms new/arms``: old seeds first)
    out.sort(key=lambda t: (t[1], found_in[t[0]] if pool else 0, str(t[0])))
    if pool:
        arms: dict[str, list[Path]] = {}
        for r, arm in out:
            arms.setdefault(arm, []).append(r)
        for arm, arm_runs in arms.items():
            runs_by_seed(arm_runs, arm)
    return out


#: Folders inside a run folder that are never run folders themselves.
_NOT_RUNS = frozenset({"checkpoint", "checkpoint.tmp", "logs", ".hydra"})


def _run_folders_under(root: Path) -> list[Path]:
    """Every folder under ``root`` holding ``metrics.csv``, following links to folders
    (``Path.rglob`` does not before Python 3.13); a folder reached twice is walked once."""
    found, walked = [], set()
    for here, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        if real in walked:  # a link back up the tree, or a second link to one folder
            dirs[:] = []
            continue
        walked.add(real)
        dirs[:] = sorted(d for d in dirs if d not in _NOT_RUNS)
        if "metrics.csv" in files:
            found.append(Path(here))
    return found


def group_runs(paths, *, pool: bool = False) -> dict[str, list[Path]]:
    """``arm -> run folders`` of :func:`find_runs` (``pool``: see there)."""
    groups: dict[str, list[Path]] = {}
    for run, arm in find_runs(paths, pool=pool):
        groups.setdefault(arm, []).append(run)
    return groups


def seed_of(run: Path) -> int | None:
    """The seed in a run folder's name (``..._seed3``), or None."""
    m = SEED_RE.search(run.name)
    return int(m.group("seed")) if m else None


def runs_by_seed(runs: Iterable[RunT], arm: str = "") -> dict[int, RunT]:
    """``seed -> run`` of one arm's runs (folders, as ``Path`` or ``str``, each returned as
    given); runs without a seed in their name are left out.

    Raises ``ValueError`` naming both folders if two runs have the same seed: pairing runs
    by seed (SPQR against its baseline) needs one run per seed and arm.
    """
    out: dict[int, RunT] = {}
    for run in runs:
        seed = seed_of(Path(run))
        if seed is None:
            continue
        if seed in out:
            raise ValueError(
                f"arm {arm!r} has two runs with seed {seed}: {out[seed]} and {run}; pairing "
                "by seed needs one run per seed and arm"
            )
        out[seed] = run
    return out
