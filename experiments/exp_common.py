"""Shared plumbing of the experiment scripts: arguments, process pool, CSV, aggregation, plots."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and PNG")
    p.add_argument("--tiny", action="store_true", help="a few seconds' setting (tests)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (1 torch thread each)")
    return p


def init_worker() -> None:
    """One torch thread per process; silence the package's one-time warnings."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)


def run_tasks(
    fn: Callable[[dict], dict],
    tasks: Sequence[dict],
    jobs: int = 1,
    cache: Path | None = None,
) -> list[dict]:
    """``fn(task)`` for every task, in ``jobs`` processes; rows in task order.

    With ``cache`` (a JSON-lines file), every finished row is appended to it at once
    and tasks already there are not run again, so an interrupted sweep resumes.
    """
    done_rows: dict[str, dict] = {}
    if cache is not None and cache.exists():
        for line in cache.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done_rows[rec["key"]] = rec["row"]
    keys = [json.dumps(t, sort_keys=True) for t in tasks]
    todo = [i for i, k in enumerate(keys) if k not in done_rows]
    rows: list[dict | None] = [done_rows.get(k) for k in keys]

    def record(i: int, row: dict, n_done: int) -> None:
        rows[i] = row
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with cache.open("a") as f:
                f.write(json.dumps({"key": keys[i], "row": row}) + "\n")
        _progress(n_done, len(todo), tasks[i])

    if jobs <= 1 or len(todo) <= 1:
        init_worker()
        for n_done, i in enumerate(todo, 1):
            record(i, fn(tasks[i]), n_done)
        return rows  # type: ignore[return-value]
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(jobs, initializer=init_worker) as pool:
        work = [(fn, i, tasks[i]) for i in todo]
        for n_done, (i, row) in enumerate(pool.imap_unordered(_indexed, work), 1):
            record(i, row, n_done)
    return rows  # type: ignore[return-value]


def toy_sweep(
    args: argparse.Namespace,
    name: str,
    run_one: Callable[[dict], dict],
    tasks: Sequence[dict],
    plot: Callable[[list[dict], Path], object],
) -> Path:
    """Run (or, with ``--plot-only``, re-read) a toy sweep: ``<out>/<name>.csv`` and ``.png``.

    Runs share the resumable cache ``<out>/.cache/toy_runs.jsonl`` across sweeps.
    """
    csv_path = args.out / f"{name}.csv"
    if args.plot_only:
        rows = read_csv(csv_path)
    else:
        rows = run_tasks(run_one, tasks, args.jobs, cache=args.out / ".cache" / "toy_runs.jsonl")
        write_csv(rows, csv_path)
    plot(rows, args.out / f"{name}.png")
    print(f"wrote {csv_path}")
    return csv_path


def _indexed(args):
    fn, i, t = args
    return i, fn(t)


def _progress(done: int, total: int, task: dict) -> None:
    if os.environ.get("EXPERIMENTS_QUIET"):
        return
    desc = " ".join(f"{k}={v}" for k, v in task.items() if not isinstance(v, (dict, list)))
    print(f"[{done}/{total}] {desc}", flush=True)


def write_csv(rows: Iterable[dict], path: Path) -> Path:
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})
    return path


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: _parse(v) for k, v in r.items()} for r in rows]


def _parse(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except (TypeError, ValueError):
            pass
    return v


def group_mean_std(rows: Sequence[dict], keys: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """Mean and (population) std of ``metrics`` over rows sharing ``keys`` (e.g. over seeds)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(keys, key))
        row["n_seeds"] = len(rs)
        for m in metrics:
            vals = [float(r[m]) for r in rs if r.get(m) not in (None, "") and _finite(r[m])]
            if vals:
                mu = sum(vals) / len(vals)
                row[m] = mu
                row[m + "_std"] = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
            else:
                row[m] = math.nan
                row[m + "_std"] = math.nan
        out.append(row)
    return out


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8})
    return plt
