"""The return of a saved policy over many episodes, and SPQR's effect on it, paired by seed.

During training a run evaluates its policy on a few episodes (``logger.eval_episodes``,
5 in the SOTA scripts), so the "final" evaluation of ``metrics.csv`` carries the noise of
those few episodes: on HalfCheetah a policy's 5-episode mean can move by 1,000 from one
evaluation to the next. To compare arms on their final policies with that noise made
small, this module re-evaluates each run's **last checkpoint** (the policy at the end of
training) on as many episodes as asked, deterministic actions (the mode of the policy,
as the training evaluations), in a fresh environment seeded by ``seed``:

- :func:`checkpoint_return`: one run, rebuilt with
  :func:`~torchrl_spqr.training.restore.load_agent`;
- :func:`return_effects`: per comparison of arms that differ only by beta (``beta0`` /
  ``beta>0``, :func:`~torchrl_spqr.analysis.report.effect_pairs`), SPQR minus baseline
  paired by seed, mean and Student-t interval;
- :func:`return_table`, :func:`return_rows`: ``evaluation.md`` / ``evaluation.csv`` of
  ``python -m torchrl_spqr.analysis RUNS --evaluate EPISODES``.

Returns are the environment's rewards summed over an episode. For offline runs whose
dataset records reference scores (D4RL's published ones, a Minari dataset's
``ref_min_score`` / ``ref_max_score``) each episode's **normalised score**,
``100 (R - ref_min) / (ref_max - ref_min)`` as the training evaluations log it, is given
too, and the tables report SPQR's effect on it beside the effect on the return. Offline
runs are evaluated in the environment their dataset names, with its ``gymnasium.make``
arguments, as during training.

Example::

    >>> from torchrl_spqr.analysis.evaluation import ReturnEstimate, return_effects
    >>> est = lambda run, mean: ReturnEstimate(run, 1000, 2, mean, 0.0, [mean, mean])
    >>> rows = return_effects([
    ...     ("beta0.0_N10", est("a/beta0.0_N10_seed0", 100.0)),
    ...     ("beta0.0_N10", est("a/beta0.0_N10_seed1", 200.0)),
    ...     ("beta1.0_N10", est("a/beta1.0_N10_seed0", 130.0)),
    ...     ("beta1.0_N10", est("a/beta1.0_N10_seed1", 210.0)),
    ... ])
    >>> rows[0]["seeds"], rows[0]["diffs"], rows[0]["diff_mean"]
    ([0, 1], [30.0, 10.0], 20.0)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchrl_spqr.analysis.report import effect_pairs
from torchrl_spqr.analysis.runs import runs_by_seed
from torchrl_spqr.analysis.stats import mean_ci, mean_sd_text

__all__ = [
    "CSV_FIELDS",
    "ReturnEstimate",
    "checkpoint_return",
    "return_effects",
    "return_rows",
    "return_table",
]


@dataclass
class ReturnEstimate:
    """The return of one run's saved policy over ``episodes`` episodes.

    ``std_return`` is the standard deviation over episodes (ddof 0, as the training
    evaluations log it); ``returns`` holds every episode's return and ``scores`` its
    normalised score (offline runs whose dataset records reference scores; else None).
    """

    run: str
    frames: int | None
    episodes: int
    mean_return: float
    std_return: float
    returns: list[float]
    meta: dict[str, Any] = field(default_factory=dict)
    scores: list[float] | None = None

    @property
    def mean_score(self) -> float | None:
        """Mean normalised score over the episodes (None: no reference scores)."""
        return statistics.mean(self.scores) if self.scores else None


def checkpoint_return(
    run_dir: str | Path, *, episodes: int = 50, seed: int = 0, max_steps: int = 1_000_000
) -> ReturnEstimate:
    """Evaluate the policy of ``run_dir``'s last checkpoint on ``episodes`` episodes.

    Args:
        run_dir: a run folder with a checkpoint (``sota_scripts`` runs, a population's
            agent folders, the examples' runs), rebuilt by ``load_agent``.
        episodes: episodes to average (each ends at the environment's own end:
            termination or its time limit).
        seed: seed of the environment's resets (the actions are deterministic); the
            same seed gives every run the same sequence of initial states.
        max_steps: an episode is cut after this many steps if the environment has not
            ended it.
    """
    from torchrl_spqr.training.common import episode_returns, return_stats
    from torchrl_spqr.training.restore import load_agent

    if episodes < 1 or max_steps < 1:
        raise ValueError(f"episodes and max_steps must be >= 1, got {episodes} and {max_steps}.")
    run_dir = Path(run_dir)
    torch.manual_seed(seed)
    # dataset=True: an offline run's environment gets its dataset's make arguments, and
    # its reference scores give the normalised score (an online run has no dataset)
    with load_agent(run_dir, dataset=True) as agent:
        agent.env.set_seed(seed)
        returns = episode_returns(agent.env, agent.actor, episodes, max_steps)
        mean, std = return_stats(returns)
        data = agent.data
        scored = data is not None and None not in (data.ref_min_score, data.ref_max_score)
        return ReturnEstimate(
            run=str(run_dir),
            frames=agent.counters.get("frames"),
            episodes=episodes,
            mean_return=mean,
            std_return=std,
            returns=returns,
            meta={"algorithm": agent.algorithm, "env": agent.env_id, "beta": agent.beta},
            scores=[data.normalized_score(r) for r in returns] if scored else None,
        )


def return_effects(
    estimates: list[tuple[str, ReturnEstimate]], level: float = 0.95
) -> list[dict[str, Any]]:
    """SPQR's effect on the re-evaluated return in each comparison, runs paired by seed.

    ``estimates`` are ``(arm, estimate)`` pairs. For every arm with ``beta > 0`` and its
    ``beta0`` twin (:func:`~torchrl_spqr.analysis.report.effect_pairs`), the seeds both
    ran, the per-seed differences SPQR minus baseline, their mean and ``level``
    Student-t interval (``diff_ci``), and each arm's mean over those seeds; when every
    paired run has normalised scores, the same for them (``score_diffs``,
    ``score_diff_mean``, ``score_diff_ci``, ``score_base_mean``, ``score_spqr_mean``). Runs without a
    seed in their name are left out; an arm with two runs of one seed raises ``ValueError``
    (:func:`~torchrl_spqr.analysis.runs.runs_by_seed`).
    """
    arm_estimates: dict[str, list[ReturnEstimate]] = {}
    for arm, est in estimates:
        arm_estimates.setdefault(arm, []).append(est)
    by_arm: dict[str, dict[int, ReturnEstimate]] = {}  # arm -> seed -> estimate
    for arm, ests in arm_estimates.items():
        of_run = {e.run: e for e in ests}
        seeds = runs_by_seed([e.run for e in ests], arm)  # one run per seed, or ValueError
        by_arm[arm] = {seed: of_run[run] for seed, run in seeds.items()}
    rows = []
    for label, beta, base_arm, spqr_arm in effect_pairs({a: [] for a in by_arm}):
        base, spqr = by_arm[base_arm], by_arm[spqr_arm]
        seeds = sorted(base.keys() & spqr.keys())
        if not seeds:
            continue
        row: dict[str, Any] = {
            "comparison": label,
            "beta": beta,
            "baseline": base_arm,
            "spqr": spqr_arm,
            "seeds": seeds,
            "level": level,
        }
        measures = [("", "mean_return")]
        if all(e[s].mean_score is not None for e in (base, spqr) for s in seeds):
            measures.append(("score_", "mean_score"))
        for prefix, attr in measures:
            b = [getattr(base[s], attr) for s in seeds]
            w = [getattr(spqr[s], attr) for s in seeds]
            diffs = [wi - bi for wi, bi in zip(w, b)]
            mean, lo, hi = (float(x[0]) for x in mean_ci(diffs, level))
            row[f"{prefix}base_mean"] = statistics.mean(b)
            row[f"{prefix}spqr_mean"] = statistics.mean(w)
            row[f"{prefix}diffs"] = diffs
            row[f"{prefix}diff_mean"] = mean
            row[f"{prefix}diff_ci"] = (lo, hi)
        rows.append(row)
    return rows


#: The columns of ``evaluation.csv`` (``python -m torchrl_spqr.analysis ... --evaluate N``).
CSV_FIELDS = (
    "arm",
    "run",
    "frames",
    "episodes",
    "mean_return",
    "std_return",
    "returns",
    "mean_score",
    "scores",
)


def return_rows(estimates: list[tuple[str, ReturnEstimate]]) -> list[dict[str, Any]]:
    """One ``evaluation.csv`` row per ``(arm, estimate)`` (``returns``, ``scores``:
    ``;``-separated; ``mean_score`` and ``scores`` empty without reference scores)."""
    return [
        {
            "arm": arm,
            "run": e.run,
            "frames": e.frames,
            "episodes": e.episodes,
            "mean_return": e.mean_return,
            "std_return": e.std_return,
            "returns": ";".join(repr(r) for r in e.returns),
            "mean_score": "" if e.mean_score is None else e.mean_score,
            "scores": "" if e.scores is None else ";".join(repr(x) for x in e.scores),
        }
        for arm, e in estimates
    ]


def return_table(estimates: list[tuple[str, ReturnEstimate]], level: float = 0.95) -> str:
    """Markdown: per arm the mean +- sd over runs of the re-evaluated return, then SPQR's
    effect per comparison (:func:`return_effects`), then one line per run; the normalised
    score beside the return wherever the runs have one (offline runs)."""

    scored = any(e.scores for _, e in estimates)
    arms: dict[str, list[ReturnEstimate]] = {}
    for arm, e in estimates:
        arms.setdefault(arm, []).append(e)
    score_head = " normalised score, mean +- sd over runs |" if scored else ""
    lines = [
        f"| arm | runs | return, mean +- sd over runs |{score_head} episodes per run |",
        "|---|---|---|---|" + ("---|" if scored else ""),
    ]
    for arm, es in arms.items():
        eps = ", ".join(str(n) for n in sorted({e.episodes for e in es}))
        score = ""
        if scored:
            have = [e.mean_score for e in es if e.mean_score is not None]
            score = f" {mean_sd_text(have) if len(have) == len(es) else 'n/a'} |"
        lines.append(
            f"| {arm} | {len(es)} | {mean_sd_text([e.mean_return for e in es])} |{score} {eps} |"
        )
    effects = return_effects(estimates, level)
    if effects:
        pct = f"{100 * level:g}%"
        lines += [
            "",
            f"| comparison | seeds | baseline / SPQR | SPQR minus baseline, paired by seed "
            f"(mean, {pct} t) | per seed |",
            "|---|---|---|---|---|",
        ]
        for r in effects:
            for prefix, what in (("", ""), ("score_", ", normalised score")):
                if f"{prefix}diff_ci" not in r:
                    continue
                lo, hi = r[f"{prefix}diff_ci"]
                lines.append(
                    f"| {r['comparison']} (beta {r['beta']:g}){what} | {len(r['seeds'])} "
                    f"| {r[f'{prefix}base_mean']:.1f} / {r[f'{prefix}spqr_mean']:.1f} "
                    f"| {r[f'{prefix}diff_mean']:+.1f} [{lo:+.1f}, {hi:+.1f}] "
                    f"| {', '.join(f'{d:+.1f}' for d in r[f'{prefix}diffs'])} |"
                )
    score_head = " normalised score (mean) |" if scored else ""
    lines += ["", f"| run | frames | episodes | return (mean +- sd over episodes) |{score_head}"]
    lines.append("|---|---|---|---|" + ("---|" if scored else ""))
    for _, e in estimates:
        score = ""
        if scored:
            score = " n/a |" if e.mean_score is None else f" {e.mean_score:.1f} |"
        lines.append(
            f"| {e.run} | {e.frames} | {e.episodes} "
            f"| {e.mean_return:.1f} +- {e.std_return:.1f} |{score}"
        )
    return "\n".join(lines)
