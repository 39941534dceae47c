"""Tables from run folders: final and best evaluation, SPQR diagnostics, SPQR's paired effect.

- :func:`summary_rows` / :func:`summary_table`: per group (arm), the final and best
  evaluation per seed, mean +- sd and a Student-t interval over seeds;
- :func:`diagnostics_rows` / :func:`diagnostics_table`: the SPQR diagnostics logged
  during training, each run's mean then mean +- sd over seeds;
- :func:`effect_pairs` / :func:`paired_effects` / :func:`effects_table`: SPQR's effect in
  every comparison of an arm ``...beta<b>...`` (``b > 0``) with its twin ``...beta0...``,
  runs paired by seed.

A diverged run (its last evaluation NaN / inf) has a NaN final, never an earlier value.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from torchrl_spqr.analysis.runs import group_runs, read_metrics, run_outcome, runs_by_seed, series
from torchrl_spqr.analysis.stats import mean_ci

__all__ = [
    "SUMMARY_DIAGNOSTICS",
    "diagnostics_rows",
    "diagnostics_table",
    "effect_pairs",
    "effects_table",
    "paired_effects",
    "run_effect_stats",
    "summary_rows",
    "summary_table",
]


def summary_rows(
    groups: dict[str, list[Path]],
    key: str = "eval_return",
    level: float = 0.95,
    *,
    until: float | None = None,
) -> list[dict[str, Any]]:
    """Per group: seeds, final step(s), final and best ``key`` per seed and their statistics.

    A run's final is its last logged ``key`` (see :func:`run_outcome`): NaN when the run
    diverged (``diverged_at``: per seed, the step it diverged at or None; ``diverged``:
    ``(run, step)`` pairs), so the group's final mean is NaN too.
    Runs that never logged ``key`` are left out (``left_out``); a group with none is omitted.
    ``until``: read each run up to that step only (see :func:`read_metrics`), so "final" is
    the last value logged at or before it and "best" the maximum up to it.
    """
    out = []
    for gname, runs in groups.items():
        finals, bests, steps, diverged_at, diverged, left_out = [], [], [], [], [], []
        for run in runs:
            res = run_outcome(read_metrics(run, until), key)
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


def summary_table(
    run_dirs_or_groups,
    key: str = "eval_return",
    level: float = 0.95,
    *,
    until: float | None = None,
) -> str:
    """Markdown table per group: final and best ``key``, mean +- sd and a t-interval over seeds.

    "final" is each run's last logged value, "best" its maximum over the run (the
    best evaluation, a biased, optimistic number reported for comparison only). With
    ``until``, both are taken over each run's rows up to that step (:func:`summary_rows`).
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

    rows = summary_rows(groups, key, level, until=until)
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
    *,
    until: float | None = None,
) -> list[dict[str, Any]]:
    """Per group and metric: each run's mean over its logged rows, then mean and sd over seeds.

    ``last_fraction`` keeps each run's last fraction of logged rows (by step), e.g. 0.5 for
    the second half of training; ``until`` reads each run up to that step only (see
    :func:`read_metrics`). A metric no run logged is left out of the group's row.
    NaN / inf values are left out of the means and counted in ``<key>_nonfinite``.
    """
    if not 0.0 < last_fraction <= 1.0:
        raise ValueError(f"last_fraction must be in (0, 1], got {last_fraction}.")
    out = []
    for gname, runs in groups.items():
        row: dict[str, Any] = {"group": gname, "seeds": len(runs)}
        metrics = [read_metrics(run, until) for run in runs]
        for key in keys:
            per_run, nonfinite = [], 0
            for rows in metrics:
                _, y = series(rows, key)
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


def diagnostics_table(
    groups: dict[str, list[Path]], last_fraction: float = 1.0, *, until: float | None = None
) -> str:
    """Markdown table of the SPQR diagnostics per group (see :func:`diagnostics_rows`).

    Reading it: independent members give an acceptance rate of about 0.95 and an MP
    ratio of about 1; the KL's independent level depends on N (about 0.62 at N = 10),
    so compare KL values only at equal N. Empty when no run logged diagnostics.
    """
    rows = diagnostics_rows(groups, last_fraction=last_fraction, until=until)
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


def _split_beta(arm: str) -> tuple[float | None, str]:
    """``(beta, the arm name without its beta parts)``; beta is None if the name has none.

    Every beta part is removed, and beta is the last one's: a population's runs written as
    ``RUNS/beta0/beta0.0_N10_seed0`` and ``RUNS/beta1/beta1.0_N10_seed0`` (one
    ``hydra.run.dir`` per arm) are arms ``beta0/beta0.0_N10`` and ``beta1/beta1.0_N10``,
    twins that differ only by beta, and the run's own name holds its beta.
    """
    found = list(_BETA_RE.finditer(arm))
    return (None, arm) if not found else (float(found[-1].group(1)), _BETA_RE.sub("", arm))


def effect_pairs(groups: dict[str, list[Path]]) -> list[tuple[str, float, str, str]]:
    """``(comparison, beta, baseline arm, SPQR arm)`` for every arm with ``beta > 0``.

    The baseline is the arm whose name differs only by ``beta0`` (``beta_0``, ``beta=0``);
    the comparison label is the arm name with its beta parts removed. An arm named with
    beta in its folder and in its run name (``beta1/beta1.0_N10``) has the run name's.
    """
    split = {arm: _split_beta(arm) for arm in groups}
    baselines = {rest: arm for arm, (beta, rest) in split.items() if beta == 0.0}
    out = []
    for arm, (beta, rest) in split.items():
        if beta and rest in baselines:
            label = rest.replace("__", "_").replace(",,", ",")
            label = label.replace("_/", "/").replace("/_", "/")
            label = re.sub("/+", "/", label).strip("_/.,=") or "default"
            out.append((label, beta, baselines[rest], arm))
    return out


def run_effect_stats(
    run: Path, key: str, until: float | None = None
) -> tuple[float, float, float | None, float | None] | None:
    """``(final, best)`` of ``key``, the mean acceptance rate (None if not logged) and the step
    the run diverged at (None if its last ``key`` is finite; its final is then NaN).

    None if the run never logged ``key``. ``until``: the run's rows up to that step only.
    """
    rows = read_metrics(run, until)
    res = run_outcome(rows, key)
    if res is None:
        return None
    _, acc = series(rows, "spqr_accept_rate")
    return res["final"], res["best"], float(np.mean(acc)) if acc else None, res["diverged_at"]


def paired_effects(
    groups: dict[str, list[Path]],
    key: str = "eval_return",
    level: float = 0.95,
    *,
    until: float | None = None,
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
    ``diverged`` lists ``(seed, arm, step)`` of such runs. ``until``: each run is read up
    to that step only (final: the last evaluation at or before it), and every row records
    it (``until``, None for whole runs). Runs without a seed in their name are left out;
    an arm with two runs of one seed raises ``ValueError`` (:func:`runs_by_seed`).
    """
    rows = []
    for label, beta, base_arm, spqr_arm in effect_pairs(groups):
        base = runs_by_seed(groups[base_arm], base_arm)
        spqr = runs_by_seed(groups[spqr_arm], spqr_arm)
        seeds = sorted(base.keys() & spqr.keys())
        vals = {
            s: (run_effect_stats(base[s], key, until), run_effect_stats(spqr[s], key, until))
            for s in seeds
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
            "until": until,
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
    """Markdown table of :func:`paired_effects` rows.

    Its footer says how far the runs were read: whole runs, every row's ``until`` (one
    step for all), or, for rows read up to different steps (comparisons at their own
    budgets), each row's step in row order.
    """
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
    untils = [r.get("until") for r in rows]
    if set(untils) <= {None}:
        span = (
            "final: last evaluation; best: maximum over the run. Acceptance: the independence "
            "test's rate, mean over training"
        )
    else:
        read_to = (
            f"every run read up to step {untils[0]:g}"
            if len(set(untils)) == 1
            else "every comparison's runs read up to its own step ("
            + ", ".join("whole runs" if u is None else f"{u:g}" for u in untils)
            + ")"
        )
        span = (
            f"{read_to}: final: last evaluation at or before it; "
            "best: maximum up to it. Acceptance: the independence test's rate, mean up to it"
        )
    lines.append("")
    lines.append(
        f"Runs paired by seed; with - without: mean over seeds of the per-seed difference, "
        f"in % of the baseline's mean, and its {pct} Student-t interval (none with one seed). "
        f"{span} then over seeds (about 0.95 for independent members)."
    )
    diverged = [(r["comparison"], *d) for r in rows for d in r.get("diverged", [])]
    if diverged:
        lines.append("")
        lines.append(
            "Diverged (last evaluation NaN/inf; its final is NaN, not an earlier value): "
            + ", ".join(f"{arm} seed {s} (from step {at:.0f})" for _, s, arm, at in diverged)
        )
    return "\n".join(lines)
