"""The command line of :mod:`torchrl_spqr.analysis`: figures and tables from run folders.

    python -m torchrl_spqr.analysis RUN_DIR [RUN_DIR ...]        # runs grouped by arm
    python -m torchrl_spqr.analysis multirun/sac_ens/Hopper-v5/  # a whole sweep folder
    python -m torchrl_spqr.analysis RUN_DIR --checkpoint         # + spectrum, correlations
    python -m torchrl_spqr.analysis RUN_DIR ... --bias           # + Q bias vs MC returns
    python -m torchrl_spqr.analysis RUN_DIR ... --evaluate 50    # + final policies, 50 episodes
    python -m torchrl_spqr.analysis SWEEP --format png svg --out figs --ci bootstrap
    python -m torchrl_spqr.analysis A/ B/ --effects figs/effects  # SPQR vs beta=0, by seed
    python -m torchrl_spqr.analysis SWEEP --until 50000 --out at50k  # all runs at 50k steps
    python -m torchrl_spqr.analysis old/arms new/arms --pool     # one arm, seeds of both

Every path is either a run folder (it holds ``metrics.csv``) or a folder searched
recursively for run folders (a Hydra multirun folder, ``benchmarks/learning/...``).
Runs whose paths differ only by the seed part (``seed3``, ``_seed3``, ``seed=3``)
form one group ("arm"); the group label is the run's path relative to the common
parent of the arguments, seed part removed. With ``--pool`` it is the run's path relative
to the argument it was found under: the same arm in several folders (a comparison and
its later seeds, ``old/arms/beta0.0_N10_seed0`` and ``new/arms/beta0.0_N10_seed3``) is
one arm holding the seeds of both, for every table and figure below; two runs of one
seed in one arm are then refused.

``python -m torchrl_spqr.plot ...`` (the old name) runs the same command.

``--until STEP`` compares the runs at a common budget: every table and figure reads
each run's rows up to STEP only (environment steps; gradient updates for offline
runs), so "final" is the last evaluation at or before STEP and "best" the maximum up
to it. A run that stopped before STEP is skipped, with a message naming it.

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
  Q-values and of their residuals across the batch);
- with ``--bias``: ``bias.md`` and ``bias.csv``, each checkpoint's Q-estimation bias
  against the Monte Carlo returns of its sampled policy (REDQ's normalised Q bias,
  :mod:`torchrl_spqr.analysis.bias`), per run and per arm;
- with ``--evaluate EPISODES``: ``evaluation.md`` and ``evaluation.csv``, each
  checkpoint's policy re-evaluated on EPISODES episodes (deterministic actions, resets
  seeded by ``--evaluate-seed``, the same for every run), per run and per arm, and SPQR's
  effect on that return, runs paired by seed (:mod:`torchrl_spqr.analysis.evaluation`):
  the runs' final policies compared with less evaluation noise than their last logged
  evaluation. Offline runs whose dataset records reference scores get the normalised
  score beside the return (and the effect on it), evaluated in their dataset's
  environment as during training.

Checkpoints: the ``checkpoint/`` folder of ``sota_scripts`` runs (config, loss
state, replay buffer) and ``checkpoint.pt`` of ``examples/spqr_demo.py`` and
``examples/redq_spqr.py`` (the script's saved arguments), rebuilt by
``torchrl_spqr.training.restore.load_agent``. The batch comes from the saved replay
buffer, else from the offline dataset named in the config, else from rolling out the
saved policy in the run's environment.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

from torchrl_spqr.analysis.critics import checkpoint_q_values
from torchrl_spqr.analysis.figures import (
    plot_diagnostics,
    plot_effects,
    plot_groups,
    plot_learning_curves,
    plot_member_correlation,
    plot_run,
    plot_spectrum,
)
from torchrl_spqr.analysis.report import (
    diagnostics_table,
    effects_table,
    paired_effects,
    summary_table,
)
from torchrl_spqr.analysis.runs import SEED_RE, check_run, find_runs, is_run, read_metrics

__all__ = ["PROG", "main"]

#: The command's name in its help and in the ``Written by`` line of ``--effects`` tables.
PROG = "python -m torchrl_spqr.analysis"


def _default_out(paths: list[Path]) -> Path:
    """``--out``'s default: the run folder for one run, else ``<common parent>/plots``."""
    if len(paths) == 1:
        return paths[0] if is_run(paths[0]) else paths[0] / "plots"
    bases = [p.parent if is_run(p) else p for p in paths]
    return Path(os.path.commonpath([str(b) for b in bases])) / "plots"


def _file_label(run: Path, arm: str, single: bool) -> str:
    """The ``<run>`` part of ``spectrum_<run>.<fmt>``: arm and seed, file-name safe."""
    if single:
        return run.name
    seed = SEED_RE.search(run.name)
    label = arm + ("_" + seed.group(1).strip("_,-=") if seed else "_" + run.name)
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label)


def _write_effects(groups, args, argv, fmts, prog: str) -> list[Path]:
    """``--effects OUT``: ``OUT.<fmt>`` and ``OUT.md`` (headed by the command that wrote it)."""
    try:
        eff = paired_effects(groups, args.key, args.level, until=args.until)
    except ValueError as err:  # an arm with two runs of one seed
        raise SystemExit(f"{prog}: error: --effects: {err}") from None
    if not eff:
        print("--effects: no pair of arms that differ only by beta0 / beta>0")
        return []
    written = plot_effects(eff, args.effects, fmts, args.level)
    md = Path(args.effects).with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    cmd = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])
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


def _step_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a step count > 0 (environment steps, or updates offline)"
        )
    return v


def _screen_runs(
    runs: list[tuple[Path, str]], key: str, p, until: float | None = None
) -> list[tuple[Path, str]]:
    """Runs usable for ``key`` (up to step ``until``); says on stderr which were skipped or
    diverged, and why.

    Refuses (``p.error``) when no run is left, naming the metrics that were logged.
    """
    kept, columns = [], set()
    for run, arm in runs:
        skip, warn = check_run(run, key, until)
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


def main(argv: list[str] | None = None, *, prog: str = PROG) -> None:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); ``prog`` names it."""
    p = argparse.ArgumentParser(
        prog=prog,
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
        "--bias",
        action="store_true",
        help="bias.md and bias.csv: each checkpoint's Q bias against Monte Carlo returns of "
        "its sampled policy (REDQ's normalised Q bias)",
    )
    p.add_argument(
        "--bias-states", type=_positive_int, default=1000, help="pairs measured by --bias"
    )
    p.add_argument(
        "--bias-cutoff",
        type=_positive_int,
        default=350,
        help="pairs kept from the start of each episode by --bias",
    )
    p.add_argument(
        "--evaluate",
        type=_positive_int,
        metavar="EPISODES",
        help="evaluation.md and evaluation.csv: each checkpoint's policy re-evaluated on "
        "EPISODES episodes (deterministic actions), and SPQR's effect on that return paired "
        "by seed",
    )
    p.add_argument(
        "--evaluate-seed",
        type=int,
        default=0,
        help="seed of the environment's resets for --evaluate (the same for every run)",
    )
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
    p.add_argument(
        "--pool",
        action="store_true",
        help="name each arm relative to the PATH its runs were found under, so that the same "
        "arm in several folders pools their seeds",
    )
    p.add_argument(
        "--until",
        type=_step_arg,
        metavar="STEP",
        help="read every run up to STEP only (compare at a common budget); runs that "
        "stopped before STEP are skipped",
    )
    args = p.parse_args(argv)
    fmts = tuple(dict.fromkeys(["png", "svg"] if args.svg else args.format))
    if args.effects_only and not args.effects:
        p.error("--effects-only needs --effects OUT")
    if args.until is not None and (
        args.per_run or args.checkpoint or args.bias or args.evaluate is not None
    ):
        p.error(
            "--until cannot be combined with --per-run (which draws each run's whole curve "
            "in its own folder), --checkpoint, --bias or --evaluate (which read the run's "
            "last checkpoint)"
        )
    paths = [Path(x) for x in args.paths]
    try:
        runs = find_runs(paths, pool=args.pool)
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    runs = _screen_runs(runs, args.key, p, args.until)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file: give a folder")
    groups: dict[str, list[Path]] = {}
    for run, arm in runs:
        groups.setdefault(arm, []).append(run)
    if args.effects_only:
        if not args.effects:
            p.error("--effects-only needs --effects OUT")
        for path in _write_effects(groups, args, argv, fmts, p.prog):
            print(path)
        return
    out = Path(args.out) if args.out else _default_out(paths)
    out.mkdir(parents=True, exist_ok=True)
    title = ", ".join(str(x) for x in args.paths) if len(paths) <= 2 else f"{len(runs)} runs"
    if args.until is not None:
        title += f", up to step {args.until:g}"
    stat = {"level": args.level, "method": args.ci, "smooth": args.smooth, "until": args.until}
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
            method=args.ci, until=args.until,
        )  # fmt: skip
    table = summary_table(groups, args.key, args.level, until=args.until)
    diag = diagnostics_table(groups, until=args.until)
    if diag:
        table += "\n\nSPQR diagnostics during training:\n\n" + diag
    if args.until is not None:
        table = f"Every run read up to step {args.until:g} (`--until`).\n\n" + table
    (out / "summary.md").write_text(table + "\n")
    written.append(out / "summary.md")
    if args.effects:
        written += _write_effects(groups, args, argv, fmts, p.prog)
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
            print(
                f"{run}: {batch.q.shape[1]} pairs ({batch.pairs}), states from the {batch.source}"
            )
            written += plot_spectrum(batch, out / f"spectrum_{label}", fmts)
            written += plot_member_correlation(batch, out / f"correlation_{label}", fmts)
    if args.bias:
        written += _write_bias(runs, out, args)
    if args.evaluate is not None:
        written += _write_evaluation(runs, out, args)
    for path in written:
        print(path)
    print(table)


def _checkpoint_report(
    runs, out: Path, stem: str, measure, describe, head: str, table, rows, fields
) -> list[Path]:
    """``measure`` each run's checkpoint (runs without one skipped, with a message), then
    write ``stem.md`` (``head`` and ``table`` of the estimates) and ``stem.csv`` (``rows``
    of them, columns ``fields``) in ``out``."""
    import csv

    estimates = []
    for run, arm in runs:
        try:
            estimate = measure(run)
        except (FileNotFoundError, ValueError) as err:
            print(f"skipped {run}: {err}")
            continue
        print(f"{run}: {describe(estimate)}")
        estimates.append((arm, estimate))
    if not estimates:
        return []
    md, table_csv = out / f"{stem}.md", out / f"{stem}.csv"
    md.write_text(head + table(estimates) + "\n")
    with table_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows(estimates))
    return [md, table_csv]


def _write_bias(runs, out: Path, args) -> list[Path]:
    """``--bias``: ``bias.md`` and ``bias.csv`` in ``out`` (runs without a checkpoint skipped)."""
    from torchrl_spqr.analysis.bias import CSV_FIELDS, bias_rows, bias_table, q_estimation_bias

    head = (
        "Q bias of each run's checkpoint (`--bias`): the saved policy sampled for whole "
        f"episodes, the first {args.bias_cutoff} pairs of each, {args.bias_states} pairs; "
        "bias = mean of the members' Q minus the discounted return with the entropy bonus, "
        "normalised by max(|return|, 10) (REDQ's test; `torchrl_spqr.analysis.bias`). "
        "Positive: overestimation.\n\n"
    )
    return _checkpoint_report(
        runs,
        out,
        "bias",
        lambda run: q_estimation_bias(run, states=args.bias_states, cutoff=args.bias_cutoff),
        lambda b: f"Q bias on {b.states} pairs of {b.episodes} episodes: {b.norm_bias:+.3f}",
        head,
        bias_table,
        bias_rows,
        CSV_FIELDS,
    )


def _write_evaluation(runs, out: Path, args) -> list[Path]:
    """``--evaluate N``: ``evaluation.md`` and ``evaluation.csv`` in ``out`` (runs without a
    checkpoint skipped)."""
    from torchrl_spqr.analysis.evaluation import (
        CSV_FIELDS,
        checkpoint_return,
        return_rows,
        return_table,
    )

    head = (
        "Each run's last checkpoint re-evaluated (`--evaluate "
        f"{args.evaluate}`, `--evaluate-seed {args.evaluate_seed}`): the saved policy, "
        f"deterministic actions, {args.evaluate} episodes in a fresh environment "
        "(`torchrl_spqr.analysis.evaluation`). Return: the environment's rewards summed "
        "over an episode; normalised score (offline runs whose dataset records reference "
        "scores): 100 (return - ref_min) / (ref_max - ref_min).\n\n"
    )
    return _checkpoint_report(
        runs,
        out,
        "evaluation",
        lambda run: checkpoint_return(run, episodes=args.evaluate, seed=args.evaluate_seed),
        lambda e: (
            f"return over {e.episodes} episodes at {e.frames} frames: {e.mean_return:.1f}"
            + ("" if e.mean_score is None else f" (normalised score {e.mean_score:.1f})")
        ),
        head,
        lambda estimates: return_table(estimates, args.level),
        return_rows,
        CSV_FIELDS,
    )
