"""Figures and tables from run folders: learning curves, SPQR diagnostics, spectra, correlations.

    python -m torchrl_spqr.plot RUN_DIR [RUN_DIR ...]           # runs grouped by arm
    python -m torchrl_spqr.plot multirun/sac_ens/Hopper-v5/     # a whole sweep folder
    python -m torchrl_spqr.plot RUN_DIR --checkpoint            # + spectrum and member correlations
    python -m torchrl_spqr.plot SWEEP --format png svg --out figs --ci bootstrap
    python -m torchrl_spqr.plot A/ B/ C/ --effects figs/effects  # SPQR vs beta=0, paired by seed

Every path is either a run folder (it holds ``metrics.csv``) or a folder searched
recursively for run folders (a Hydra multirun folder, ``benchmarks/learning/...``).
Runs whose paths differ only by the seed part (``seed3``, ``_seed3``, ``seed=3``)
form one group ("arm"); the group label is the run's path relative to the common
parent of the arguments, seed part removed.

Written into ``--out`` (default: the run folder for one run, else ``<common
parent>/plots``):

- ``learning_curves.<fmt>``: evaluation and training return per group, mean over
  seeds and a confidence band of that mean (95% Student-t interval by default,
  or a percentile bootstrap with ``--ci bootstrap``);
- ``diagnostics.<fmt>``: the SPQR diagnostics logged during training, same grouping;
- ``summary.md``: final and best evaluation per group, seeds counted, and the SPQR
  diagnostics per group (mean over training, then over seeds);
- with ``--effects OUT``: ``OUT.<fmt>`` and ``OUT.md``, SPQR's effect in every
  comparison of an arm ``...beta<b>...`` (``b > 0``) with its twin ``...beta0...``:
  final and best evaluation, SPQR minus baseline per seed (runs paired by seed),
  mean and Student-t interval, and both arms' acceptance rates;
- with ``--checkpoint``: ``spectrum_<run>.<fmt>`` (histogram of the normalised
  SPQR eigenvalues of the saved ensemble on a batch, against the semicircle and
  the paper / corrected target densities, and the spike statistic against its
  null) and ``correlation_<run>.<fmt>`` (``N x N`` correlation of the members'
  Q-values and of their residuals across the batch).

Checkpoints: the ``checkpoint/`` folder of ``sota_scripts`` runs (config, loss
state, replay buffer) and ``checkpoint.pt`` of ``examples/spqr_demo.py`` and
``examples/redq_spqr.py`` (settings read from the run folder's name). The
batch comes from the saved replay buffer, else from the offline dataset named in
the config, else from rolling out the saved policy in the run's environment.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "read_metrics",
    "find_runs",
    "group_name",
    "group_runs",
    "mean_ci",
    "group_curve",
    "plot_run",
    "plot_groups",
    "plot_learning_curves",
    "plot_diagnostics",
    "summary_rows",
    "summary_table",
    "diagnostics_rows",
    "diagnostics_table",
    "effect_pairs",
    "paired_effects",
    "effects_table",
    "plot_effects",
    "EnsembleBatch",
    "checkpoint_q_values",
    "plot_spectrum",
    "plot_member_correlation",
    "main",
]

_DIAG = [
    ("spqr_kl", "SPQR KL"),
    ("spqr_spike", "spike (max |eigenvalue|)"),
    ("spqr_accept_rate", "acceptance rate (level 0.05)"),
    ("spqr_mp_ratio", "residual top eigenvalue / MP edge"),
    ("spqr_ensemble_std", "ensemble std of Q"),
]

#: Panels of ``diagnostics.<fmt>``: metric, axis label, reference line (value, label) or None.
DIAGNOSTICS = [
    ("spqr_kl", "SPQR KL (mean over batch)", None),
    ("spqr_spike", "spike: max |eigenvalue|", None),
    (
        "spqr_accept_rate",
        "acceptance rate of the\nindependence test (level 0.05)",
        (0.95, "dashed: 0.95, the rate of independent members"),
    ),
    (
        "spqr_mp_ratio",
        "residual top eigenvalue\n/ Marchenko-Pastur edge",
        (1.0, "dashed: 1, the edge for independent members"),
    ),
    ("spqr_mean_pairwise_corr", "mean pairwise residual\ncorrelation", None),
    ("spqr_ensemble_std", "ensemble std of Q", None),
]

_LABELS = {
    "eval_return": "evaluation return",
    "train_return": "training episode return",
    "normalized_score": "normalised score",
}

_SEED_RE = re.compile(r"([_,\-]?seed[=_\-]?(?P<seed>\d+))", re.IGNORECASE)


# ------------------------------------------------------------------ reading


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Rows of ``metrics.csv`` with numeric values (empty cells dropped)."""
    rows = []
    with (Path(run_dir) / "metrics.csv").open(newline="") as f:
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


def _step_key(rows) -> str:
    return "frames" if any(r.get("frames", 0) > 0 for r in rows) else "updates"


def _series(rows, key):
    step = _step_key(rows)
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
    step = _step_key(rows)
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


def check_run(run_dir: str | Path, key: str) -> tuple[str | None, str | None]:
    """``(reason to skip the run, warning)`` for ``key``; both None for a sound run.

    Skipped: an unreadable, empty or header-only ``metrics.csv``, or one that never
    logged ``key``. Warned about (kept, its final reported as NaN): a run whose last
    ``key`` is NaN / inf, or whose ``key`` is never finite.
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
    out = run_outcome(rows, key)
    if out is None:
        return f"no {key} logged in its {len(rows)} rows", None
    step = _step_key(rows)
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


def _strip_seed(name: str) -> str:
    return _SEED_RE.sub("", name).strip("_,-= ")


def group_name(run_dir: str | Path) -> str:
    """Runs that differ only by seed share a group: the folder name without ``seed<k>``."""
    name = Path(run_dir).name
    return _strip_seed(name) or name


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
    parts = [_strip_seed(p) for p in rel.parts] or [group_name(run_dir)]
    if parts and (parts[-1] == "" or parts[-1].isdigit()):
        hydra = _hydra_overrides_name(run_dir)
        if hydra is not None:  # Hydra's numbered multirun subfolders
            parts[-1] = hydra or "default"
    parts = [p for p in parts if p]
    return "/".join(parts) or group_name(run_dir)


def _is_run(path: Path) -> bool:
    return (path / "metrics.csv").is_file()


def find_runs(paths) -> list[tuple[Path, str]]:
    """Run folders under ``paths`` (each a run folder or a folder searched recursively).

    Returns ``(run_dir, arm)`` pairs sorted by arm then path; the arm is the run's
    path relative to the common parent of ``paths`` with the seed part removed.
    """
    roots = [Path(p) for p in paths]
    runs: list[Path] = []
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist.")
        if _is_run(root):
            runs.append(root)
            continue
        found = sorted(
            p.parent
            for p in root.rglob("metrics.csv")
            if not ({"checkpoint", "checkpoint.tmp", "logs", ".hydra"} & set(p.parent.parts))
        )
        if not found:
            raise FileNotFoundError(f"No run folder (holding metrics.csv) under {root}.")
        runs.extend(found)
    bases = [r.parent if _is_run(r) else r for r in roots]
    base = Path(os.path.commonpath([str(b.resolve()) for b in bases]))
    seen, out = set(), []
    for r in runs:
        key = r.resolve()
        if key not in seen:
            seen.add(key)
            out.append((r, _arm_of(r.resolve(), base)))
    return sorted(out, key=lambda t: (t[1], str(t[0])))


def group_runs(paths) -> dict[str, list[Path]]:
    """``arm -> run folders`` of :func:`find_runs`."""
    groups: dict[str, list[Path]] = {}
    for run, arm in find_runs(paths):
        groups.setdefault(arm, []).append(run)
    return groups


# --------------------------------------------------------------- statistics

# Two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (used without scipy).
_T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip


def _t_quantile(level: float, df: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.5 + level / 2, df))
    except ImportError:
        if abs(level - 0.95) > 1e-9:
            raise ImportError("A t-interval at a level other than 0.95 needs scipy.") from None
        return _T975[df - 1] if df <= 30 else 1.96 + 2.4 / df


def mean_ci(
    values, level: float = 0.95, method: str = "t", *, resamples: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds (axis 0) and a ``level`` confidence interval of that mean.

    ``method="t"``: ``mean +- t_{(1+level)/2, S-1} * sd / sqrt(S)`` (sd with ddof 1);
    ``method="bootstrap"``: percentile bootstrap of the mean (``resamples`` draws,
    seeded). With one seed the interval is the mean itself.
    """
    if method not in ("t", "bootstrap"):
        raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1) (e.g. 0.95), got {level}.")
    v = np.asarray(values, dtype=float)
    if v.ndim == 1:
        v = v[:, None]
    s = v.shape[0]
    mean = v.mean(0)
    if s < 2:
        return mean, mean.copy(), mean.copy()
    if method == "t":
        half = _t_quantile(level, s - 1) * v.std(0, ddof=1) / math.sqrt(s)
        return mean, mean - half, mean + half
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, s, size=(resamples, s))
        means = v[idx].mean(1)  # [R, T]
        lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2], axis=0)
        return mean, lo, hi
    raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}.")


def _ci_text(method: str, level: float) -> str:
    pct = f"{100 * level:g}%"
    if method == "t":
        return f"{pct} Student-t confidence interval of the mean over seeds"
    return f"{pct} percentile-bootstrap confidence interval of the mean over seeds"


def _smooth(y: list[float], window: int) -> list[float]:
    if window <= 1 or len(y) < 2:
        return y
    out, acc = [], []
    for v in y:  # trailing moving average
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


@dataclass
class GroupCurve:
    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    seeds: int
    step_key: str
    interpolated: bool = False
    values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def group_curve(
    runs_rows: list[list[dict[str, float]]],
    key: str,
    *,
    level: float = 0.95,
    method: str = "t",
    smooth: int = 1,
) -> GroupCurve | None:
    """Mean and confidence band of ``key`` over the runs of one group.

    Runs logged at the same steps are aligned exactly; otherwise each run is
    linearly interpolated onto the union of steps inside the range all runs cover.
    Runs without ``key`` are left out; ``None`` if none has it.
    """
    series = []
    for rows in runs_rows:
        x, y = _series(rows, key)
        if x:
            series.append((np.asarray(x, float), np.asarray(_smooth(y, smooth), float)))
    if not series:
        return None
    step_key = _step_key(runs_rows[0])
    common = sorted(set.intersection(*(set(x.tolist()) for x, _ in series)))
    union = sorted(set().union(*(set(x.tolist()) for x, _ in series)))
    interpolated = False
    if len(common) == len(union) or len(series) == 1:
        steps = np.asarray(common if len(series) > 1 else union, float)
        vals = np.stack([[dict(zip(x.tolist(), y.tolist()))[t] for t in steps] for x, y in series])
    else:
        lo_x = max(x[0] for x, _ in series)
        hi_x = min(x[-1] for x, _ in series)
        steps = np.asarray([t for t in union if lo_x <= t <= hi_x], float)
        if steps.size == 0:
            return None
        vals = np.stack([np.interp(steps, x, y) for x, y in series])
        interpolated = True
    mean, lo, hi = mean_ci(vals, level, method)
    return GroupCurve(steps, mean, lo, hi, len(series), step_key, interpolated, vals)


# ------------------------------------------------------------------ figures


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, formats) -> list[Path]:
    """Write ``fig`` as ``out.<fmt>`` for each format and close it; ``[]`` when ``fig`` is None."""
    if fig is None:
        return []
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out.with_name(out.name + "." + fmt)
        fig.savefig(p, dpi=110)
        paths.append(p)
    _mpl().close(fig)
    return paths


def plot_run(run_dir: str | Path, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Write ``learning_curve.<fmt>`` (evaluation and training return, diagnostics) in ``run_dir``."""
    plt = _mpl()
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    ax = axes[0, 0]
    x, y = _series(rows, "eval_return")
    ax.plot(x, y, "o-", label="evaluation (deterministic, mean over episodes)")
    x, y = _series(rows, "train_return")
    ax.plot(x, y, ".", alpha=0.5, label="training episodes")
    xlabel = "environment steps" if _step_key(rows) == "frames" else "gradient updates"
    if any("normalized_score" in r for r in rows):
        x, y = _series(rows, "normalized_score")
        ax2 = ax.twinx()
        ax2.plot(x, y, "s--", color="tab:green", label="normalised score")
        ax2.set_ylabel("normalised score (100 = reference expert)")
        ax2.legend(fontsize=8, loc="lower right")
    ax.set(xlabel=xlabel, ylabel="return", title=run_dir.name)
    ax.legend(fontsize=8)
    for ax, (key, label) in zip(axes.flat[1:], _DIAG):
        x, y = _series(rows, key)
        ax.plot(x, y)
        ax.set(xlabel=xlabel, ylabel=label, title=label)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, run_dir / "learning_curve", formats)


def _group_rows(groups: dict[str, list[Path]]) -> dict[str, list[list[dict[str, float]]]]:
    return {g: [read_metrics(r) for r in runs] for g, runs in groups.items()}


def _panels(
    rows_by_group,
    panels: list[tuple[str, str, Any]],
    *,
    title: str,
    level: float,
    method: str,
    smooth: int,
    ncols: int = 3,
):
    """One panel per metric, one line (mean) and band (CI) per group; legend below."""
    plt = _mpl()
    panels = [
        p
        for p in panels
        if any(_series(rows, p[0])[0] for runs in rows_by_group.values() for rows in runs)
    ]
    if not panels:
        return None
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    n_groups = len(rows_by_group)
    legend_cols = 1 if n_groups > 4 else min(n_groups, 2)
    legend_rows = math.ceil(n_groups / legend_cols)
    fig_h = 3.4 * nrows + 0.8 + 0.22 * legend_rows
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.2 * ncols, fig_h), squeeze=False, layout="constrained"
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles, interpolated = {}, False
    for ax, (key, label, ref) in zip(axes.flat, panels):
        step_keys = set()
        for i, (gname, runs) in enumerate(rows_by_group.items()):
            c = group_curve(runs, key, level=level, method=method, smooth=smooth)
            if c is None:
                continue
            interpolated |= c.interpolated
            step_keys.add(c.step_key)
            color = colors[i % len(colors)]
            (line,) = ax.plot(c.steps, c.mean, color=color, lw=1.6)
            if c.seeds > 1:
                ax.fill_between(c.steps, c.lo, c.hi, color=color, alpha=0.2, lw=0)
            seeds = f"{c.seeds} seed" + ("s" if c.seeds > 1 else ", no band")
            handles.setdefault(gname, (line, f"{gname} ({seeds})"))
        if ref is not None:
            ax.axhline(ref[0], color="k", ls="--", lw=0.9, alpha=0.7)
            ax.set_title(ref[1], fontsize=8.5)
        names = {"frames": "environment steps", "updates": "gradient updates"}
        ax.set_xlabel(" / ".join(names[k] for k in sorted(step_keys)) or "steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    caption = f"line: mean over seeds; band: {_ci_text(method, level)}"
    if smooth > 1:
        caption += f"; each run smoothed by a trailing mean over {smooth} logged points"
    if interpolated:
        caption += "; runs interpolated onto common steps"
    fig.suptitle(f"{title}\n{caption}", fontsize=10)
    hs = [h for h, _ in handles.values()]
    ls = [lab for _, lab in handles.values()]
    fig.legend(hs, ls, loc="outside lower center", ncol=legend_cols, fontsize=9, frameon=False)
    return fig


def plot_learning_curves(
    groups: dict[str, list[Path]],
    out: str | Path,
    *,
    key: str = "eval_return",
    formats=("png",),
    level: float = 0.95,
    method: str = "t",
    smooth: int = 1,
    title: str = "",
) -> list[Path]:
    """``out.<fmt>``: ``key``, training return (and normalised score) per group over steps."""
    rows = _group_rows(groups)
    keys = [key, "train_return", "normalized_score", "eval_return"]
    keys = list(dict.fromkeys(keys))[:3]
    panels = [(k, _LABELS.get(k, k), None) for k in keys]
    fig = _panels(
        rows,
        panels,
        title=title or "learning curves",
        level=level,
        method=method,
        smooth=smooth,
    )
    return _save(fig, Path(out), formats)


def plot_diagnostics(
    groups: dict[str, list[Path]],
    out: str | Path,
    *,
    formats=("png",),
    level: float = 0.95,
    method: str = "t",
    smooth: int = 1,
    title: str = "",
) -> list[Path]:
    """``out.<fmt>``: the SPQR diagnostics of :data:`DIAGNOSTICS` per group over steps."""
    fig = _panels(
        _group_rows(groups),
        DIAGNOSTICS,
        title=title or "SPQR diagnostics during training",
        level=level,
        method=method,
        smooth=smooth,
    )
    return _save(fig, Path(out), formats)


def plot_groups(
    run_dirs,
    out: str | Path,
    keys: tuple[str, ...] = ("eval_return", "spqr_kl", "spqr_accept_rate"),
    formats: tuple[str, ...] = ("png",),
    *,
    level: float = 0.95,
    method: str = "t",
) -> list[Path]:
    """One figure ``out.<fmt>``, one panel per metric in ``keys``, runs grouped by arm."""
    rows = _group_rows(group_runs(run_dirs))
    labels = {k: lab for k, lab, _ in DIAGNOSTICS}
    panels = [(k, _LABELS.get(k, labels.get(k, k)), None) for k in keys]
    fig = _panels(
        rows, panels, title="comparison", level=level, method=method, smooth=1, ncols=len(keys)
    )
    out = Path(out)
    return _save(fig, out.with_suffix("") if out.suffix in (".png", ".svg") else out, formats)


# ------------------------------------------------------------------ summary


def summary_rows(
    groups: dict[str, list[Path]], key: str = "eval_return", level: float = 0.95
) -> list[dict[str, Any]]:
    """Per group: seeds, final step(s), final and best ``key`` per seed and their statistics.

    A run's final is its last logged ``key`` (see :func:`run_outcome`): NaN when the run
    diverged (``diverged_at``: per seed, the step it diverged at or None; ``diverged``:
    ``(run, step)`` pairs), so the group's final mean is NaN too.
    Runs that never logged ``key`` are left out (``left_out``); a group with none is omitted.
    """
    out = []
    for gname, runs in groups.items():
        finals, bests, steps, diverged_at, diverged, left_out = [], [], [], [], [], []
        for run in runs:
            res = run_outcome(read_metrics(run), key)
            if res is None:
                left_out.append(run)
                continue
            finals.append(res["final"])
            bests.append(res["best"])
            steps.append(res["final_step"])
            diverged_at.append(res["diverged_at"])
            if res["diverged_at"] is not None:
                diverged.append((run, res["diverged_at"]))
        if not finals:
            continue
        row: dict[str, Any] = {
            "group": gname,
            "seeds": len(finals),
            "steps": steps,
            "diverged_at": diverged_at,
            "diverged": diverged,
            "left_out": left_out,
        }
        for name, vals in (("final", finals), ("best", bests)):
            mean, lo, hi = mean_ci(np.asarray(vals)[:, None], level, "t")
            row[name] = vals
            row[f"{name}_mean"] = float(mean[0])
            finite = all(math.isfinite(v) for v in vals)
            sd = statistics.stdev(vals) if len(vals) > 1 and finite else 0.0
            row[f"{name}_sd"] = sd if finite else math.nan
            row[f"{name}_ci"] = (float(lo[0]), float(hi[0]))
        out.append(row)
    return out


def summary_table(run_dirs_or_groups, key: str = "eval_return", level: float = 0.95) -> str:
    """Markdown table per group: final and best ``key``, mean +- sd and a t-interval over seeds.

    "final" is each run's last logged value, "best" its maximum over the run (the
    best evaluation, a biased, optimistic number reported for comparison only).
    """
    groups = (
        run_dirs_or_groups
        if isinstance(run_dirs_or_groups, dict)
        else group_runs(run_dirs_or_groups)
    )
    pct = f"{100 * level:g}%"
    lines = [
        f"| group | seeds | at step | final {key} (mean +- sd) | final {pct} CI "
        f"| best {key} (mean +- sd) | best {pct} CI | per seed: final / best |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ci(r, name):
        if r["seeds"] < 2 or not math.isfinite(r[f"{name}_mean"]):
            return "-"
        lo, hi = r[f"{name}_ci"]
        return f"[{lo:.1f}, {hi:.1f}]"

    def stat(r, name):
        if math.isfinite(r[f"{name}_mean"]):
            return f"{r[f'{name}_mean']:.1f} +- {r[f'{name}_sd']:.1f}"
        bad = sum(not math.isfinite(v) for v in r[name])
        return f"NaN ({bad} of {r['seeds']} diverged)"

    def per_seed(r):
        cells = []
        for f, b, at in zip(r["final"], r["best"], r["diverged_at"]):
            final = f"{f:.1f}" if at is None else f"NaN (diverged at step {at:.0f})"
            cells.append(f"{final} / {b:.1f}")
        return ", ".join(cells)

    rows = summary_rows(groups, key, level)
    for r in rows:
        lo_s, hi_s = min(r["steps"]), max(r["steps"])
        at = f"{lo_s:.0f}" if lo_s == hi_s else f"{lo_s:.0f}-{hi_s:.0f}"
        lines.append(
            f"| {r['group']} | {r['seeds']} | {at} "
            f"| {stat(r, 'final')} | {ci(r, 'final')} "
            f"| {stat(r, 'best')} | {ci(r, 'best')} "
            f"| {per_seed(r)} |"
        )
    lines.append("")
    diverged = [(run, step) for r in rows for run, step in r["diverged"]]
    if diverged:
        lines.append(
            f"Diverged ({key} NaN/inf at its last evaluation; its final is NaN, not an earlier "
            "value): " + ", ".join(f"{run} (from step {step:.0f})" for run, step in diverged)
        )
        lines.append("")
    lines.append(
        f"sd: standard deviation over seeds (ddof 1); CI: {pct} Student-t interval of the mean "
        "over seeds; final: last logged value of each run; best: maximum over each run; "
        "per seed: in the order of the run folders."
    )
    return "\n".join(lines)


#: Columns of :func:`diagnostics_table` (metric, header).
SUMMARY_DIAGNOSTICS = (
    ("spqr_kl", "SPQR KL"),
    ("spqr_spike", "spike"),
    ("spqr_accept_rate", "acceptance rate"),
    ("spqr_mp_ratio", "MP ratio"),
    ("spqr_ensemble_std", "ensemble std"),
)


def diagnostics_rows(
    groups: dict[str, list[Path]],
    keys=tuple(k for k, _ in SUMMARY_DIAGNOSTICS),
    last_fraction: float = 1.0,
) -> list[dict[str, Any]]:
    """Per group and metric: each run's mean over its logged rows, then mean and sd over seeds.

    ``last_fraction`` keeps each run's last fraction of logged rows (by step), e.g. 0.5 for
    the second half of training. A metric no run logged is left out of the group's row.
    NaN / inf values are left out of the means and counted in ``<key>_nonfinite``.
    """
    if not 0.0 < last_fraction <= 1.0:
        raise ValueError(f"last_fraction must be in (0, 1], got {last_fraction}.")
    out = []
    for gname, runs in groups.items():
        row: dict[str, Any] = {"group": gname, "seeds": len(runs)}
        metrics = [read_metrics(run) for run in runs]
        for key in keys:
            per_run, nonfinite = [], 0
            for rows in metrics:
                _, y = _series(rows, key)
                nonfinite += sum(1 for r in rows if key in r and not math.isfinite(r[key]))
                if y:
                    y = y[len(y) - max(1, math.ceil(last_fraction * len(y))) :]
                    per_run.append(float(np.mean(y)))
            if nonfinite:
                row[f"{key}_nonfinite"] = nonfinite
            if per_run:
                row[key] = per_run
                row[f"{key}_mean"] = float(np.mean(per_run))
                row[f"{key}_sd"] = statistics.stdev(per_run) if len(per_run) > 1 else 0.0
        if any(k in row for k in keys):
            out.append(row)
    return out


def diagnostics_table(groups: dict[str, list[Path]], last_fraction: float = 1.0) -> str:
    """Markdown table of the SPQR diagnostics per group (see :func:`diagnostics_rows`).

    Reading it: independent members give an acceptance rate of about 0.95 and an MP
    ratio of about 1; the KL's independent level depends on N (about 0.62 at N = 10),
    so compare KL values only at equal N. Empty when no run logged diagnostics.
    """
    rows = diagnostics_rows(groups, last_fraction=last_fraction)
    if not rows:
        return ""
    cols = [(k, h) for k, h in SUMMARY_DIAGNOSTICS if any(k in r for r in rows)]
    lines = [
        "| group | seeds | " + " | ".join(h for _, h in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [f"{r[f'{k}_mean']:.4f} +- {r[f'{k}_sd']:.4f}" if k in r else "-" for k, _ in cols]
        lines.append(f"| {r['group']} | {r['seeds']} | " + " | ".join(cells) + " |")
    part = "all logged updates" if last_fraction == 1.0 else f"the last {last_fraction:g} of them"
    lines.append("")
    lines.append(
        f"Each run's mean over {part} (each logged value is one training batch), then mean "
        "+- sd over seeds. Independent members: acceptance about 0.95, MP ratio about 1; "
        "compare the KL only at equal N."
    )
    dropped = [
        f"{r['group']}: {r[f'{k}_nonfinite']} {h}"
        for r in rows
        for k, h in SUMMARY_DIAGNOSTICS
        if f"{k}_nonfinite" in r
    ]
    if dropped:
        lines.append("")
        lines.append("NaN/inf values left out of these means: " + "; ".join(dropped) + ".")
    return "\n".join(lines)


# ------------------------------------------------------- SPQR effect, paired

_BETA_RE = re.compile(r"(?<![A-Za-z])beta[=_\-]?(\d+(?:\.\d+)?(?:e[+\-]?\d+)?)(?=$|[_,/])")


def _seed_of(run: Path) -> int | None:
    m = _SEED_RE.search(run.name)
    return int(m.group("seed")) if m else None


def _split_beta(arm: str) -> tuple[float | None, str]:
    """``(beta, the arm name without its beta part)``; beta is None if the name has none."""
    m = _BETA_RE.search(arm)
    return (None, arm) if m is None else (float(m.group(1)), arm[: m.start()] + arm[m.end() :])


def effect_pairs(groups: dict[str, list[Path]]) -> list[tuple[str, float, str, str]]:
    """``(comparison, beta, baseline arm, SPQR arm)`` for every arm with ``beta > 0``.

    The baseline is the arm whose name differs only by ``beta0`` (``beta_0``, ``beta=0``);
    the comparison label is the arm name with the beta part removed.
    """
    split = {arm: _split_beta(arm) for arm in groups}
    baselines = {rest: arm for arm, (beta, rest) in split.items() if beta == 0.0}
    out = []
    for arm, (beta, rest) in split.items():
        if beta and rest in baselines:
            label = rest.replace("__", "_").replace(",,", ",")
            label = label.replace("_/", "/").replace("/_", "/").strip("_/.,=") or "default"
            out.append((label, beta, baselines[rest], arm))
    return out


def _run_effect_stats(
    run: Path, key: str
) -> tuple[float, float, float | None, float | None] | None:
    """``(final, best)`` of ``key``, the mean acceptance rate (None if not logged) and the step
    the run diverged at (None if its last ``key`` is finite; its final is then NaN).

    None if the run never logged ``key``.
    """
    rows = read_metrics(run)
    res = run_outcome(rows, key)
    if res is None:
        return None
    _, acc = _series(rows, "spqr_accept_rate")
    return res["final"], res["best"], float(np.mean(acc)) if acc else None, res["diverged_at"]


def paired_effects(
    groups: dict[str, list[Path]], key: str = "eval_return", level: float = 0.95
) -> list[dict[str, Any]]:
    """SPQR's effect in each comparison of :func:`effect_pairs`, runs paired by seed.

    Per comparison: the seeds both arms ran; for ``final`` (last evaluation) and
    ``best`` (maximum over the run) of ``key``, the per-seed difference SPQR minus
    baseline, its mean and Student-t interval (``*_diff_mean``, ``*_diff_ci``), and
    the same relative to the baseline's mean (``*_rel_mean``, ``*_rel_ci``, in
    percent); ``*_wins``: the seeds where SPQR is higher. Also each arm's acceptance
    rate (``accept_base``, ``accept_spqr``: mean over training, then over seeds) when
    logged. With one seed the intervals collapse to the point. A run whose last ``key`` is
    NaN / inf (diverged) has a NaN final, so that comparison's final statistics are NaN;
    ``diverged`` lists ``(seed, arm, step)`` of such runs.
    """
    rows = []
    for label, beta, base_arm, spqr_arm in effect_pairs(groups):
        base = {_seed_of(r): r for r in groups[base_arm]}
        spqr = {_seed_of(r): r for r in groups[spqr_arm]}
        seeds = sorted(s for s in base.keys() & spqr.keys() if s is not None)
        vals = {
            s: (_run_effect_stats(base[s], key), _run_effect_stats(spqr[s], key)) for s in seeds
        }
        seeds = [s for s in seeds if vals[s][0] is not None and vals[s][1] is not None]
        if not seeds:
            continue
        row: dict[str, Any] = {
            "comparison": label,
            "beta": beta,
            "baseline": base_arm,
            "spqr": spqr_arm,
            "seeds": seeds,
            "key": key,
        }
        for i, name in enumerate(("final", "best")):
            b = np.array([vals[s][0][i] for s in seeds])
            w = np.array([vals[s][1][i] for s in seeds])
            mean, lo, hi = mean_ci(w - b, level, "t")
            scale = abs(float(b.mean())) or 1.0
            row[f"{name}_base"] = float(b.mean())
            row[f"{name}_spqr"] = float(w.mean())
            row[f"{name}_diff_mean"] = float(mean[0])
            row[f"{name}_diff_ci"] = (float(lo[0]), float(hi[0]))
            row[f"{name}_rel_mean"] = 100 * float(mean[0]) / scale
            row[f"{name}_rel_ci"] = (100 * float(lo[0]) / scale, 100 * float(hi[0]) / scale)
            row[f"{name}_wins"] = int((w > b).sum())
        row["diverged"] = [
            (s, arm, vals[s][j][3])
            for s in seeds
            for j, arm in enumerate((base_arm, spqr_arm))
            if vals[s][j][3] is not None
        ]
        for j, tag in enumerate(("base", "spqr")):
            acc = [vals[s][j][2] for s in seeds]
            if all(a is not None for a in acc):
                row[f"accept_{tag}"] = float(np.mean(acc))
        rows.append(row)
    return rows


def effects_table(rows: list[dict[str, Any]], level: float = 0.95) -> str:
    """Markdown table of :func:`paired_effects` rows."""
    pct = f"{100 * level:g}%"
    key = rows[0]["key"] if rows else "eval_return"
    lines = [
        f"| comparison | beta | seeds | final {key}: without / with | final: with - without "
        f"({pct} CI) | SPQR higher | best: without / with | best: with - without ({pct} CI) "
        "| acceptance: without / with |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def diff(r, name):
        if not math.isfinite(r[f"{name}_diff_mean"]):
            return "NaN (a run diverged)"
        lo, hi = r[f"{name}_diff_ci"]
        ci = f" [{lo:+.1f}, {hi:+.1f}]" if len(r["seeds"]) > 1 else ""
        return f"{r[f'{name}_diff_mean']:+.1f} ({r[f'{name}_rel_mean']:+.1f}%){ci}"

    for r in rows:
        acc = (
            f"{r['accept_base']:.3f} / {r['accept_spqr']:.3f}"
            if "accept_base" in r and "accept_spqr" in r
            else "-"
        )
        n = len(r["seeds"])
        lines.append(
            f"| {r['comparison']} | {r['beta']:g} | {n} "
            f"| {r['final_base']:.1f} / {r['final_spqr']:.1f} | {diff(r, 'final')} "
            f"| {r['final_wins']} of {n} "
            f"| {r['best_base']:.1f} / {r['best_spqr']:.1f} | {diff(r, 'best')} | {acc} |"
        )
    lines.append("")
    lines.append(
        f"Runs paired by seed; with - without: mean over seeds of the per-seed difference, "
        f"in % of the baseline's mean, and its {pct} Student-t interval (none with one seed). "
        "final: last evaluation; best: maximum over the run. Acceptance: the independence "
        "test's rate, mean over training then over seeds (about 0.95 for independent members)."
    )
    diverged = [(r["comparison"], *d) for r in rows for d in r.get("diverged", [])]
    if diverged:
        lines.append("")
        lines.append(
            "Diverged (last evaluation NaN/inf; its final is NaN, not an earlier value): "
            + ", ".join(f"{arm} seed {s} (from step {at:.0f})" for _, s, arm, at in diverged)
        )
    return "\n".join(lines)


def plot_effects(
    rows: list[dict[str, Any]], out: str | Path, formats=("png",), level: float = 0.95
) -> list[Path]:
    """``out.<fmt>``: forest plot of SPQR's paired effect per comparison (final, best, acceptance)."""
    if not rows:
        return []
    plt = _mpl()
    n = len(rows)
    has_acc = any("accept_base" in r for r in rows)
    ncols = 3 if has_acc else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols + 3, 0.55 * n + 2.2), sharey=True)
    ys = np.arange(n)[::-1]
    labels = [
        f"{r['comparison']} (beta={r['beta']:g}, {len(r['seeds'])} "
        f"seed{'s' if len(r['seeds']) > 1 else ''})"
        for r in rows
    ]
    for ax, name in zip(axes, ("final", "best")):
        for y, r in zip(ys, rows):
            m = r[f"{name}_rel_mean"]
            lo, hi = r[f"{name}_rel_ci"]
            one = len(r["seeds"]) < 2
            ax.errorbar(
                m, y, xerr=[[m - lo], [hi - m]], fmt="s" if one else "o",
                color="tab:gray" if one else "tab:blue", capsize=3,
            )  # fmt: skip
        ax.axvline(0.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel(f"{name} {rows[0]['key']}: SPQR - baseline\n(% of the baseline's mean)")
        ax.grid(alpha=0.3)
    if has_acc:
        ax = axes[2]
        for y, r in zip(ys, rows):
            if "accept_base" in r:
                ax.plot([r["accept_base"], r["accept_spqr"]], [y, y], color="0.7", zorder=1)
                ax.scatter(r["accept_base"], y, marker="o", color="tab:gray", zorder=2)
                ax.scatter(r["accept_spqr"], y, marker="D", color="tab:red", zorder=3)
        ax.axvline(0.95, color="k", lw=0.8, ls="--")
        ax.set_xlabel("acceptance rate of the independence test\n(dashed: 0.95, independent)")
        ax.scatter([], [], marker="o", color="tab:gray", label="baseline")
        ax.scatter([], [], marker="D", color="tab:red", label="SPQR")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(ys, labels, fontsize=8)
    pct = f"{100 * level:g}%"
    fig.suptitle(
        f"SPQR's effect, runs paired by seed: mean difference and {pct} Student-t interval "
        "(grey squares: one seed, no interval)",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, Path(out), formats)


# ----------------------------------------------------- checkpoint analysis


@dataclass
class EnsembleBatch:
    """Q-values of a saved ensemble on a batch, and the SPQR settings of its run."""

    q: torch.Tensor  # [N, B]
    num_members: int
    filling: str
    density: str
    rho: float
    eps: float
    pairs: str
    source: str
    label: str
    meta: dict[str, Any] = field(default_factory=dict)
    inputs: Any = None  # the TensorDict of (observation, action) pairs the critics saw


#: Run-folder names of the examples, which keep their settings there (not in the checkpoint).
_EXAMPLE_RES = {
    "examples/spqr_demo.py": re.compile(
        r"spqr_sac_ens_(?P<env>.+)_N(?P<n>\d+)_beta(?P<beta>[^_]+)_seed(?P<seed>\d+)"
    ),
    "examples/redq_spqr.py": re.compile(
        r"redq_spqr_(?P<env>.+)_N(?P<n>\d+)_M(?P<m>\d+)_G(?P<g>\d+)_beta(?P<beta>[^_]+)"
        r"_seed(?P<seed>\d+)"
    ),
}


def _find_checkpoint(run_dir: Path) -> tuple[str, Path]:
    from torchrl_spqr.training.checkpoint import has_checkpoint

    if has_checkpoint(run_dir):  # the newest complete one is chosen (and verified) on load
        return "run_context", run_dir / "checkpoint"
    if (run_dir / "checkpoint.pt").is_file():
        return "example", run_dir / "checkpoint.pt"
    raise FileNotFoundError(
        f"No checkpoint in {run_dir}: expected checkpoint/state.pt (sota_scripts runs) or "
        "checkpoint.pt (examples/spqr_demo.py, examples/redq_spqr.py)."
    )


def _rebuild_run_context(run_dir: Path, ck_dir: Path):
    from torchrl_spqr.training import builders as B
    from torchrl_spqr.training.checkpoint import load_checkpoint_data

    # verified against its manifest; the buffer read without unpickling anything
    state, buffer_data, ck_dir = load_checkpoint_data(run_dir)
    cfg = state.get("config")
    if not cfg:
        raise ValueError(f"{ck_dir}/state.pt holds no 'config': cannot rebuild the agent.")
    data = None
    env_name = B._get(cfg, "env.name")
    env_kwargs = None
    if not env_name or (B._get(cfg, "dataset.id") and "buffer_meta" not in state):
        try:  # offline run: the dataset holds the states (and names the environment)
            from torchrl_spqr.training.offline import make_offline_data

            data = make_offline_data(cfg)
            env_name = env_name or data.env_id
            env_kwargs = getattr(data, "env_kwargs", None)
        except Exception as err:
            if not env_name:
                raise ValueError(
                    f"{run_dir}: the config names no env.name and the dataset "
                    f"{B._get(cfg, 'dataset.id')!r} could not be loaded ({err})."
                ) from err
    seed = int(B._get(cfg, "seed", 0)) + 20_000
    if B._get(cfg, "env.name") and env_kwargs is None:
        env = B.make_environment(cfg, seed)
    else:
        env_cfg = {
            "env": {"name": env_name, "max_episode_steps": B._get(cfg, "env.max_episode_steps")}
        }
        env = B.make_environment(env_cfg, seed, env_kwargs=env_kwargs)
    _actor, loss, base, _opt, _upd = B.make_agent(cfg, env)
    loss.load_state_dict(state["loss"])
    buffer_td = buffer_data
    spqr = {
        "pairs": str(B._get(cfg, "spqr.pairs", "next_policy")),
        "filling": str(B._get(cfg, "spqr.filling", "ordered")),
        "density": str(B._get(cfg, "spqr.density", "paper")),
    }
    info = {
        "algorithm": B._get(cfg, "algorithm"),
        "env": env_name,
        "beta": B._get(cfg, "spqr.beta"),
        "frames": state.get("counters", {}).get("frames"),
        "updates": state.get("counters", {}).get("updates"),
    }
    return env, loss, base, buffer_td, data, spqr, info


def _rebuild_example(run_dir: Path, path: Path):
    """The agent of an ``examples/spqr_demo.py`` or ``examples/redq_spqr.py`` run.

    Their ``checkpoint.pt`` holds ``{"actor", "loss"}`` state dicts; the settings
    are read from the run folder's name and the hidden width from the weights.
    """
    from torchrl_spqr import QEnsemble, SPQRLoss, make_q_member
    from torchrl_spqr.objectives import EnsembleSACLoss, ReferenceREDQLoss
    from torchrl_spqr.training import builders as B

    found = [(sc, pat.fullmatch(run_dir.name)) for sc, pat in _EXAMPLE_RES.items()]
    found = [(sc, m) for sc, m in found if m is not None]
    if not found:
        raise ValueError(
            f"{path} looks like a checkpoint of the examples, but the folder name "
            f"{run_dir.name!r} matches neither spqr_sac_ens_<env>_N<N>_beta<b>_seed<s> "
            "(examples/spqr_demo.py) nor redq_spqr_<env>_N<N>_M<M>_G<G>_beta<b>_seed<s> "
            "(examples/redq_spqr.py), which is where they keep their settings."
        )
    script, m = found[0]
    from torchrl_spqr.safe_io import load_state

    state = load_state(path)  # torch.load(weights_only=True), a clear error if damaged
    actor_w = [v for k, v in state["actor"].items() if k.endswith("weight")]
    hidden = int(actor_w[0].shape[0])
    n = int(m["n"])
    cfg = {
        "env": {"name": m["env"]},
        "network": {"hidden_sizes": [hidden, hidden], "ensemble_size": n},
    }
    env = B.make_environment(cfg, int(m["seed"]) + 20_000)
    actor = B.make_actor(cfg, env)
    n_in = env.observation_spec["observation"].shape[-1] + env.action_spec.shape[-1]
    critics = QEnsemble(lambda: make_q_member(n_in, num_cells=(hidden, hidden)), n)
    if script.endswith("redq_spqr.py"):
        base = ReferenceREDQLoss(
            actor,
            critics,
            sub_sample_len=int(m["m"]),
            policy_update_delay=int(m["g"]),
            target_entropy=-float(env.action_spec.shape[-1]),  # overwritten by the state dict
            action_spec=env.action_spec,
        )
        algorithm = f"redq M={m['m']} G={m['g']} ({script})"
    else:
        base = EnsembleSACLoss(
            actor, critics.members(), num_qvalue_nets=n, loss_function="l2",
            action_spec=env.action_spec,
        )  # fmt: skip
        base.make_value_estimator(gamma=0.99)  # as the demo; gamma itself is in the state dict
        algorithm = f"sac_ens ({script})"
    loss = SPQRLoss(base, beta=float(m["beta"])) if n >= 3 else base
    res = loss.load_state_dict(state["loss"], strict=False)
    lazy = ("target_entropy", "_value_estimator")  # buffers registered at the first update
    bad = [k for k in (*res.missing_keys, *res.unexpected_keys) if not any(s in k for s in lazy)]
    if bad:
        raise ValueError(f"{path}: state dict does not match the {script} agent ({bad[:5]}).")
    if isinstance(loss, SPQRLoss):
        spqr = {"pairs": loss.pairs, "filling": loss.filling, "density": loss.density}
    else:
        spqr = {"pairs": "next_policy", "filling": "ordered", "density": "paper"}
    info = {"algorithm": algorithm, "env": m["env"], "beta": m["beta"]}
    return env, loss, base, None, None, spqr, info


def _policy(base):
    """A callable ``td -> td`` running the loss's actor with its (trained) parameters."""
    net, params = base.actor_network, base.actor_network_params.detach()

    def policy(td):
        with params.to_module(net):
            return net(td)

    return policy


def _rollout(env, policy, steps: int):
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        td = env.rollout(steps, policy, break_when_any_done=False)
    return td.reshape(-1)


def _ensemble_q(base, td) -> torch.Tensor:
    """``[N, B]`` Q-values of the online critics of ``base`` at the pairs in ``td``."""
    net, params = base.qvalue_network, base.qvalue_network_params.detach()
    key = net.out_keys[0]
    was_training = net.training
    net.eval()
    qs = []
    with torch.no_grad():
        for i in range(params.batch_size[0]):
            with params[i].to_module(net):
                qs.append(net(td.select(*net.in_keys).copy()).get(key).reshape(-1))
    net.train(was_training)
    return torch.stack(qs)


def checkpoint_q_values(
    run_dir: str | Path,
    *,
    batch_size: int = 512,
    rollout_steps: int = 300,
    pairs: str | None = None,
    source: str = "auto",
    seed: int = 0,
) -> EnsembleBatch:
    """Rebuild a run's agent from its checkpoint and evaluate its critics on a batch.

    Args:
        run_dir: a ``sota_scripts`` run folder (``checkpoint/state.pt`` with the
            config, rebuilt with :func:`torchrl_spqr.training.builders.make_agent`)
            or an ``examples/spqr_demo.py`` / ``examples/redq_spqr.py`` run folder
            (``checkpoint.pt``; settings read from the folder name).
        batch_size: number of state-action pairs (fewer if fewer are available).
        rollout_steps: environment steps rolled out with the saved (stochastic)
            policy when the states come from a rollout.
        pairs: ``"data"`` (stored or rolled-out ``(s, a)``), ``"next_policy"``
            (``(s', a' ~ pi(s'))``, the authors' SPQR pairs) or ``"policy"``
            (``(s, a ~ pi(s))``); default: the run's ``spqr.pairs``.
        source: ``"auto"`` (replay buffer if saved, else offline dataset, else
            rollout), ``"buffer"``, ``"dataset"`` or ``"rollout"``.
        seed: seed of the batch draw and of the policy's samples.
    """
    from torchrl_spqr.objectives.spqr import SPQRLoss

    run_dir = Path(run_dir)
    kind, path = _find_checkpoint(run_dir)
    torch.manual_seed(seed)
    rebuild = _rebuild_run_context if kind == "run_context" else _rebuild_example
    env, loss, base, buffer_td, data, spqr, info = rebuild(run_dir, path)
    pairs = pairs or spqr["pairs"]
    if pairs not in ("data", "next_policy", "policy"):
        raise ValueError(f"pairs must be 'data', 'next_policy' or 'policy', got {pairs!r}.")
    policy = _policy(base)
    gen = torch.Generator().manual_seed(seed)
    if source in ("auto", "buffer") and buffer_td is not None:
        n = buffer_td.shape[0]
        td = buffer_td[torch.randperm(n, generator=gen)[: min(batch_size, n)]]
        src = f"replay buffer of the checkpoint ({n} transitions)"
    elif source in ("auto", "dataset") and data is not None:
        td = data.buffer.sample(batch_size)
        src = "offline dataset of the run"
    elif source in ("auto", "rollout"):
        roll = _rollout(env, policy, rollout_steps)
        n = roll.shape[0]
        td = roll[torch.randperm(n, generator=gen)[: min(batch_size, n)]]
        src = f"rollout of the saved policy ({n} steps)"
    else:
        raise ValueError(f"source={source!r} is not available for {run_dir}.")
    env.close()
    td = td.to("cpu")
    if pairs == "data":
        q_td = td.select("observation", "action", strict=False)
    else:
        obs = td.get(("next", "observation") if pairs == "next_policy" else "observation")
        from tensordict import TensorDict
        from torchrl.envs.utils import ExplorationType, set_exploration_type

        q_td = TensorDict({"observation": obs.float()}, batch_size=obs.shape[:1])
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            q_td = policy(q_td)
    q_td = q_td.select("observation", "action").float()
    q = _ensemble_q(base, q_td)
    spqr_mod = loss if isinstance(loss, SPQRLoss) else None
    return EnsembleBatch(
        q=q,
        num_members=q.shape[0],
        filling=spqr["filling"],
        density=spqr["density"],
        rho=spqr_mod.rho if spqr_mod else 0.5,
        eps=spqr_mod.eps if spqr_mod else 0.01,
        pairs=pairs,
        source=src,
        label=run_dir.name,
        meta=info,
        inputs=q_td,
    )


def _pairs_text(pairs: str) -> str:
    return {
        "data": "Q_k(s, a) at stored pairs",
        "next_policy": "Q_k(s', a'~pi(s'))",
        "policy": "Q_k(s, a~pi(s))",
    }[pairs]


def _density_ok(rho: float, eps: float, density: str) -> bool:
    from torchrl_spqr import functional as F

    try:
        F.check_density_params(rho, eps, density)
    except (TypeError, ValueError):
        return False
    return True


def plot_spectrum(batch: EnsembleBatch, out: str | Path, formats=("png",)) -> list[Path]:
    """Histogram of the normalised SPQR eigenvalues against the semicircle; spike vs its null.

    Left: the eigenvalues of every normalised ``d x d`` SPQR matrix of the batch
    (the matrices the regulariser uses), the eigenvalue density of i.i.d.
    Gaussian members at the same ``d`` (the finite-``d`` null), Wigner's
    semicircle, and the two target densities of the KL (``"paper"`` and
    ``"corrected"``, with the run's ``rho`` and ``eps``; they are the unnormalised
    functions the KL uses). Right: the spike statistic against its null with the
    5% rejection threshold.
    """
    from torchrl_spqr import diagnostics as D
    from torchrl_spqr import functional as F

    plt = _mpl()
    q = batch.q.double()
    n = q.shape[0]
    d = F.matrix_side(n)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eig = F.spqr_eigenvalues(q, batch.filling, generator=gen)  # [B, d]
        t = d * (d + 1) // 2
        null_eig = F.spqr_eigenvalues(torch.randn(t, 20_000, generator=gen, dtype=torch.float64))
    # the "corrected" density needs rho < 1 and eps > 0: a run outside that range gets the
    # paper curve only (its own density), not an error
    densities = [dens for dens in ("paper", "corrected") if _density_ok(batch.rho, batch.eps, dens)]
    kls = {
        dens: float(F.spectral_kl(eig, rho=batch.rho, eps=batch.eps, density=dens).mean())
        for dens in densities
    }
    kl_null = float(F.spectral_kl(null_eig, rho=batch.rho, eps=batch.eps, density="paper").mean())
    xmax = max(2.6, float(eig.abs().max()) * 1.08)
    xs = torch.linspace(-xmax, xmax, 801, dtype=torch.float64)

    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(13, 6.2), gridspec_kw={"width_ratios": [1.5, 1]}, layout="constrained"
    )
    bins = np.linspace(-xmax, xmax, 49)
    ax.hist(
        eig.flatten().numpy(),
        bins=bins,
        density=True,
        color="tab:blue",
        alpha=0.55,
        label=f"ensemble eigenvalues ({eig.shape[0]} pairs x d={d})",
    )
    ax.hist(
        null_eig.flatten().numpy(),
        bins=bins,
        density=True,
        histtype="step",
        color="k",
        lw=1.2,
        label=f"i.i.d. Gaussian members, same d={d} (null)",
    )
    ax.plot(xs, F.semicircle_density(xs), color="tab:green", lw=1.8, label="Wigner semicircle")
    for dens, style in (("paper", "--"), ("corrected", ":")):
        if dens not in kls:
            continue
        ax.plot(
            xs,
            F.soft_semicircle_density(xs, rho=batch.rho, eps=batch.eps, density=dens),
            style,
            color="tab:red" if dens == "paper" else "tab:purple",
            lw=1.8,
            label=f"SPQR target p(x), {dens} (KL {kls[dens]:.3f})",
        )
    ax.set_xlabel("eigenvalue of the normalised SPQR matrix")
    ax.set_ylabel("density")
    ax.set_xlim(-xmax, xmax)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    ax.set_title(
        f"spectrum: KL paper {kls['paper']:.3f} (null {kl_null:.3f}); "
        f"used density: {batch.density}",
        fontsize=10,
    )

    spikes = eig.abs().amax(-1)
    null_sp = D.spike_null_distribution(d)
    thr = float(null_sp[int(0.95 * (null_sp.numel() - 1))])
    accept = float((D.spike_pvalue(spikes, d) >= 0.05).double().mean())
    s_lo = min(float(spikes.min()), float(null_sp[int(0.001 * null_sp.numel())])) * 0.98
    sbins = np.linspace(s_lo, max(float(spikes.max()), float(null_sp[-1])) * 1.02, 41)
    ax2.hist(spikes.numpy(), bins=sbins, density=True, alpha=0.55, label="ensemble")
    ax2.hist(
        null_sp.numpy(), bins=sbins, density=True, histtype="step", color="k", lw=1.2, label="null"
    )
    ax2.axvline(thr, color="tab:red", ls="--", lw=1.2, label=f"5% threshold {thr:.2f}")
    ax2.set_xlabel("spike: max |eigenvalue| per pair")
    ax2.set_ylabel("density")
    ax2.set_title(f"independence test: acceptance {accept:.3f} (null 0.95)", fontsize=10)
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    ax2.grid(alpha=0.3)
    meta = batch.meta
    when = f", {meta['frames']} frames" if meta.get("frames") else ""
    fig.suptitle(
        f"{batch.label}: {meta.get('algorithm', '')} on {meta.get('env', '')}{when}, "
        f"N={n} (d={d}, {batch.filling} filling), {_pairs_text(batch.pairs)}\n"
        f"states: {batch.source}",
        fontsize=10,
    )
    return _save(fig, Path(out), formats)


def _corr(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return x @ x.T


def plot_member_correlation(batch: EnsembleBatch, out: str | Path, formats=("png",)) -> list[Path]:
    """``N x N`` Pearson correlations across the batch: of the Q-values and of the residuals.

    Residuals are the members' deviations from the ensemble mean at each pair
    (the quantity of :func:`torchrl_spqr.diagnostics.residual_correlation`); for
    independent members their off-diagonal correlation is ``-1/(N-1)``.
    """
    from torchrl_spqr import diagnostics as D

    plt = _mpl()
    q = batch.q.double()
    n = q.shape[0]
    cq = _corr(q)
    cr = _corr(q - q.mean(0, keepdim=True))
    stats = D.residual_correlation(q)
    off = ~torch.eye(n, dtype=torch.bool)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 6.4), layout="constrained")
    lo_q = float(cq[off].min())
    vr = max(float(cr[off].abs().max()), 1e-3)
    panels = [
        (
            axes[0],
            cq,
            "viridis",
            min(lo_q, 0.999),
            1.0,
            f"Q-values\nmean off-diagonal {float(cq[off].mean()):.3f}",
        ),
        (
            axes[1],
            cr,
            "RdBu_r",
            -vr,
            vr,
            f"residuals (deviations from the ensemble mean)\nmean off-diagonal "
            f"{float(stats['mean_pairwise_corr']):.3f} (independent: {-1 / (n - 1):.3f}), "
            f"MP ratio {float(stats['mp_ratio']):.2f}",
        ),
    ]
    for ax, mat, cmap, vmin, vmax, title in panels:
        im = ax.imshow(mat.numpy(), cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("member")
        ax.set_ylabel("member")
        ticks = list(range(n)) if n <= 12 else list(range(0, n, max(1, n // 10)))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        cb = fig.colorbar(im, ax=ax, shrink=0.9)
        cb.set_label("Pearson correlation across the batch")
        if n <= 10:
            for i in range(n):
                for j in range(n):
                    v = float(mat[i, j])
                    r, g, b, _ = im.cmap(im.norm(v))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if dark else "k",
                    )  # fmt: skip
    meta = batch.meta
    fig.suptitle(
        f"{batch.label}: member correlations, N={n}, {q.shape[1]} pairs "
        f"{_pairs_text(batch.pairs)}\nstates: {batch.source}; {meta.get('env', '')}",
        fontsize=10,
    )
    return _save(fig, Path(out), formats)


# ---------------------------------------------------------------------- CLI


def _default_out(paths: list[Path]) -> Path:
    if len(paths) == 1:
        return paths[0] if _is_run(paths[0]) else paths[0] / "plots"
    bases = [p.parent if _is_run(p) else p for p in paths]
    return Path(os.path.commonpath([str(b) for b in bases])) / "plots"


def _file_label(run: Path, arm: str, single: bool) -> str:
    if single:
        return run.name
    seed = _SEED_RE.search(run.name)
    label = arm + ("_" + seed.group(1).strip("_,-=") if seed else "_" + run.name)
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label)


def _write_effects(groups, args, argv, fmts) -> list[Path]:
    """``--effects OUT``: ``OUT.<fmt>`` and ``OUT.md`` (headed by the command that wrote it)."""
    eff = paired_effects(groups, args.key, args.level)
    if not eff:
        print("--effects: no pair of arms that differ only by beta0 / beta>0")
        return []
    written = plot_effects(eff, args.effects, fmts, args.level)
    md = Path(args.effects).with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python -m torchrl_spqr.plot", *(sys.argv[1:] if argv is None else argv)])
    md.write_text(f"Written by `{cmd}`\n\n" + effects_table(eff, args.level) + "\n")
    return [*written, md]


def _level_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the confidence level must be a number in (0, 1), e.g. 0.95 or 0.9"
        )
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return v


def _screen_runs(runs: list[tuple[Path, str]], key: str, p) -> list[tuple[Path, str]]:
    """Runs usable for ``key``; says on stderr which were skipped or diverged, and why.

    Refuses (``p.error``) when no run is left, naming the metrics that were logged.
    """
    kept, columns = [], set()
    for run, arm in runs:
        skip, warn = check_run(run, key)
        if skip is not None:
            print(f"skipped {run}: {skip}", file=sys.stderr)
            if skip.startswith("no "):
                columns |= {k for r in read_metrics(run) for k in r}
            continue
        if warn is not None:
            print(f"warning: {run}: {warn}", file=sys.stderr)
        kept.append((run, arm))
    if not kept:
        logged = ", ".join(sorted(columns)) if columns else "none"
        p.error(
            f"no run left to report --key {key} for ({len(runs)} run folder(s) skipped, see "
            f"above); metrics these runs did log: {logged}"
        )
    return kept


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m torchrl_spqr.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="run folders or sweep folders")
    p.add_argument("--out", help="output folder (default: see above)")
    p.add_argument("--format", nargs="+", default=["png"], choices=["png", "svg", "pdf"])
    p.add_argument("--svg", action="store_true", help="same as --format png svg")
    p.add_argument("--key", default="eval_return", help="evaluation metric (e.g. normalized_score)")
    p.add_argument("--ci", default="t", choices=["t", "bootstrap"], help="confidence band")
    p.add_argument(
        "--level", type=_level_arg, default=0.95, help="confidence level of the band, in (0, 1)"
    )
    p.add_argument(
        "--smooth", type=_positive_int, default=1, help="trailing mean over W logged points"
    )
    p.add_argument("--per-run", action="store_true", help="also learning_curve.<fmt> in each run")
    p.add_argument(
        "--checkpoint",
        "--spectrum",
        action="store_true",
        help="spectrum and member-correlation figures of each run's checkpoint",
    )
    p.add_argument("--batch-size", type=_positive_int, default=512, help="pairs for --checkpoint")
    p.add_argument(
        "--rollout-steps", type=_positive_int, default=300, help="steps if states are rolled out"
    )
    p.add_argument("--pairs", choices=["data", "next_policy", "policy"], default=None)
    p.add_argument("--source", choices=["auto", "buffer", "dataset", "rollout"], default="auto")
    p.add_argument(
        "--compare",
        metavar="OUT",
        help="also one figure OUT.<fmt> of --key and three diagnostics side by side",
    )
    p.add_argument(
        "--effects",
        metavar="OUT",
        help="also OUT.<fmt> and OUT.md: SPQR's effect per comparison (arms that differ only "
        "by beta0 / beta>0), runs paired by seed",
    )
    p.add_argument("--effects-only", action="store_true", help="write only the --effects outputs")
    args = p.parse_args(argv)
    fmts = tuple(dict.fromkeys(["png", "svg"] if args.svg else args.format))
    if args.effects_only and not args.effects:
        p.error("--effects-only needs --effects OUT")
    paths = [Path(x) for x in args.paths]
    try:
        runs = find_runs(paths)
    except FileNotFoundError as err:
        p.error(str(err))
    runs = _screen_runs(runs, args.key, p)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file: give a folder")
    groups: dict[str, list[Path]] = {}
    for run, arm in runs:
        groups.setdefault(arm, []).append(run)
    if args.effects_only:
        if not args.effects:
            p.error("--effects-only needs --effects OUT")
        for path in _write_effects(groups, args, argv, fmts):
            print(path)
        return
    out = Path(args.out) if args.out else _default_out(paths)
    out.mkdir(parents=True, exist_ok=True)
    title = ", ".join(str(x) for x in args.paths) if len(paths) <= 2 else f"{len(runs)} runs"
    stat = {"level": args.level, "method": args.ci, "smooth": args.smooth}
    written = plot_learning_curves(
        groups, out / "learning_curves", key=args.key, formats=fmts, title=title, **stat
    )
    written += plot_diagnostics(groups, out / "diagnostics", formats=fmts, title=title, **stat)
    if args.per_run:
        for run, _ in runs:
            written += plot_run(run, fmts)
    if args.compare:
        keys = (args.key, "spqr_kl", "spqr_accept_rate", "spqr_spike")
        written += plot_groups(
            [r for r, _ in runs], args.compare, keys=keys, formats=fmts, level=args.level,
            method=args.ci,
        )  # fmt: skip
    table = summary_table(groups, args.key, args.level)
    diag = diagnostics_table(groups)
    if diag:
        table += "\n\nSPQR diagnostics during training:\n\n" + diag
    (out / "summary.md").write_text(table + "\n")
    written.append(out / "summary.md")
    if args.effects:
        written += _write_effects(groups, args, argv, fmts)
    if args.checkpoint:
        single = len(runs) == 1
        for run, arm in runs:
            try:
                batch = checkpoint_q_values(
                    run,
                    batch_size=args.batch_size,
                    rollout_steps=args.rollout_steps,
                    pairs=args.pairs,
                    source=args.source,
                )
            except (FileNotFoundError, ValueError) as err:
                print(f"skipped {run}: {err}")
                continue
            label = _file_label(run, arm, single)
            written += plot_spectrum(batch, out / f"spectrum_{label}", fmts)
            written += plot_member_correlation(batch, out / f"correlation_{label}", fmts)
    for path in written:
        print(path)
    print(table)


if __name__ == "__main__":
    main()
