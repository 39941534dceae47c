"""Q-estimation bias over training, from the checkpoints a run kept as it ran.

A run keeps only its newest checkpoint unless ``checkpoint.history=true``, which keeps
each checkpoint's networks in ``<run or agent folder>/history/<step>/``. This script reads
those (every ``history/<step>/checkpoint`` under the path), or, where there are none,
copies of the checkpoints taken while the run trained, laid out as
``SNAPSHOTS/<agent>/<any name>/checkpoint/``. Each is a run folder that
``torchrl_spqr.training.restore.load_agent`` can rebuild. For each, it measures the
bias with ``torchrl_spqr.analysis.bias.q_estimation_bias`` (REDQ's test: 1,000 pairs, the
first 350 of each sampled episode, seed 0), and it appends one row per copy to
``--csv``. A copy already in the CSV is skipped, so the script can be run again while
training goes on. A copy that does not load (caught mid-write: its manifest does not
match) is reported and skipped.

``--plot PNG`` draws the normalised bias of the members' mean and of their minimum
against the environment steps, per arm (the agent's name without its seed): the mean
over seeds, with a band of +- one standard deviation.

    python benchmarks/learning/bias_over_training.py RUN_DIR --csv bias_over_training.csv \
        --plot bias_over_training.png
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from torchrl_spqr.analysis.bias import q_estimation_bias
from torchrl_spqr.analysis.runs import group_name

FIELDS = (
    "arm", "agent", "snapshot", "frames", "states", "episodes", "alpha", "mean_return",
    "mean_q", "bias", "norm_bias", "norm_bias_std", "min_norm_bias", "min_norm_bias_std",
)  # fmt: skip


def measure(snapshots: Path, out: Path, states: int = 1000) -> None:
    done = set()
    if out.exists():
        with out.open(newline="") as f:
            done = {(r["agent"], r["snapshot"]) for r in csv.DictReader(f)}
    new = not out.exists()
    with out.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        copies = sorted(snapshots.glob("**/history/*/checkpoint"))
        for copy in copies or sorted(snapshots.glob("*/*/checkpoint")):
            run = copy.parent
            agent = run.parent.parent.name if run.parent.name == "history" else run.parent.name
            snap = run.name
            if (agent, snap) in done:
                continue
            try:
                b = q_estimation_bias(run, states=states)
            except Exception as err:  # a copy caught mid-write, or not an agent
                print(f"skipped {run}: {type(err).__name__}: {err}")
                continue
            row = {"arm": group_name(agent), "agent": agent, "snapshot": snap}
            row.update({k: getattr(b, k) for k in FIELDS[3:]})
            w.writerow(row)
            f.flush()
            print(f"{agent} at {b.frames}: normalised bias {b.norm_bias:+.3f}")


def plot(csv_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    arms = sorted({r["arm"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, arm in enumerate(arms):
        color = f"C{i}"
        for key, style, what in (
            ("norm_bias", "-", "members' mean"),
            ("min_norm_bias", "--", "minimum"),
        ):
            by_step: dict[int, list[float]] = {}
            for r in rows:
                if r["arm"] == arm:
                    by_step.setdefault(int(r["frames"]), []).append(float(r[key]))
            steps = sorted(
                s for s, v in by_step.items() if len(v) == max(map(len, by_step.values()))
            )
            mean = [statistics.mean(by_step[s]) for s in steps]
            sd = [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
            n = len(by_step[steps[0]]) if steps else 0
            ax.plot(
                steps,
                mean,
                style,
                marker="o",
                markersize=3,
                color=color,
                label=f"{arm}, {what} ({n} seeds)",
            )
            if key == "norm_bias":
                ax.fill_between(
                    steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                    color=color, alpha=0.15, linewidth=0,
                )  # fmt: skip
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("normalised Q bias (Q - G) / max(|G|, 10)")
    ax.set_title("Q bias against soft Monte Carlo returns (mean +- sd over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(png)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "snapshots", type=Path, help="a run (or population) folder, or SNAPSHOTS/<agent>/<name>/"
    )
    p.add_argument("--csv", type=Path, required=True, help="rows appended here")
    p.add_argument("--plot", type=Path, help="also this PNG from the CSV")
    p.add_argument("--states", type=int, default=1000, help="pairs per measurement")
    p.add_argument("--no-measure", action="store_true", help="only plot the CSV")
    args = p.parse_args()
    if not args.no_measure:
        measure(args.snapshots, args.csv, args.states)
    if args.plot:
        plot(args.csv, args.plot)


if __name__ == "__main__":
    main()
