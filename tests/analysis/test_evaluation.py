"""A saved policy re-evaluated on many episodes (``torchrl_spqr.analysis.evaluation``)."""

from __future__ import annotations

import csv
import shutil
import statistics

import pytest
import torch

from torchrl_spqr.analysis import evaluation as E
from torchrl_spqr.analysis.stats import mean_ci


def _est(run: str, mean: float, episodes: int = 4) -> E.ReturnEstimate:
    return E.ReturnEstimate(run, 1000, episodes, mean, 0.0, [mean] * episodes)


def test_checkpoint_return_is_the_deterministic_policy_over_whole_episodes(sota_run):
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    from torchrl_spqr.training.restore import load_agent

    est = E.checkpoint_return(sota_run, episodes=3, seed=4)
    assert est.episodes == 3 and len(est.returns) == 3 and est.frames == 60
    assert est.mean_return == pytest.approx(statistics.mean(est.returns))
    assert est.std_return == pytest.approx(statistics.pstdev(est.returns))
    assert all(r < 0 for r in est.returns)  # Pendulum's rewards are <= 0
    # the same episodes by hand: resets seeded by `seed`, the policy's mode, whole episodes
    with load_agent(sota_run) as agent:
        agent.env.set_seed(4)
        by_hand = []
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            for _ in range(3):
                td = agent.env.rollout(10_000, agent.actor, break_when_any_done=True)
                assert td.shape[-1] == 200  # Pendulum's time limit: whole episodes
                by_hand.append(float(td["next", "reward"].sum()))
    assert est.returns == pytest.approx(by_hand)
    assert E.checkpoint_return(sota_run, episodes=3, seed=4).returns == est.returns
    assert E.checkpoint_return(sota_run, episodes=3, seed=5).returns != est.returns


def test_checkpoint_return_refuses_bad_input(sota_run, tmp_path):
    with pytest.raises(ValueError, match="episodes"):
        E.checkpoint_return(sota_run, episodes=0)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        E.checkpoint_return(tmp_path, episodes=1)


def test_return_effects_pair_the_runs_by_seed():
    estimates = [
        ("x/beta0.0_N10", _est("r/beta0.0_N10_seed0", 100.0)),
        ("x/beta0.0_N10", _est("r/beta0.0_N10_seed1", 200.0)),
        ("x/beta0.0_N10", _est("r/beta0.0_N10_seed2", 300.0)),  # no SPQR twin: left out
        ("x/beta1.0_N10", _est("r/beta1.0_N10_seed1", 260.0)),  # listed before seed 0
        ("x/beta1.0_N10", _est("r/beta1.0_N10_seed0", 90.0)),
        ("x/beta0.5_N10", _est("r/beta0.5_N10_seed0", 150.0)),
        ("y/beta1.0_N10", _est("r/beta1.0_N10_seed0", 1.0)),  # no baseline: no comparison
    ]
    rows = {r["spqr"]: r for r in E.return_effects(estimates)}
    assert set(rows) == {"x/beta1.0_N10", "x/beta0.5_N10"}
    one = rows["x/beta1.0_N10"]
    assert one["baseline"] == "x/beta0.0_N10" and one["beta"] == 1.0
    assert one["seeds"] == [0, 1] and one["diffs"] == [-10.0, 60.0]
    mean, lo, hi = (float(x[0]) for x in mean_ci([-10.0, 60.0]))
    assert one["diff_mean"] == mean == 25.0 and one["diff_ci"] == pytest.approx((lo, hi))
    assert (one["base_mean"], one["spqr_mean"]) == (150.0, 175.0)
    assert rows["x/beta0.5_N10"]["seeds"] == [0] and rows["x/beta0.5_N10"]["diffs"] == [50.0]
    with pytest.raises(ValueError, match="two runs with seed 1"):
        E.return_effects(estimates + [("x/beta1.0_N10", _est("s/beta1.0_N10_seed1", 0.0))])


def test_return_table_lists_arms_effects_and_runs():
    estimates = [
        ("beta0.0_N10", _est("r/beta0.0_N10_seed0", 100.0)),
        ("beta0.0_N10", _est("r/beta0.0_N10_seed1", 200.0)),
        ("beta1.0_N10", _est("r/beta1.0_N10_seed0", 130.0)),
        ("beta1.0_N10", _est("r/beta1.0_N10_seed1", 210.0)),
    ]
    text = E.return_table(estimates)
    assert "| beta0.0_N10 | 2 | 150.0 +- 70.7 | 4 |" in text
    assert "| beta1.0_N10 | 2 | 170.0 +- 56.6 | 4 |" in text
    (row,) = E.return_effects(estimates)
    lo, hi = row["diff_ci"]
    assert f"| 2 | 150.0 / 170.0 | +20.0 [{lo:+.1f}, {hi:+.1f}] | +30.0, +10.0 |" in text
    assert "| r/beta1.0_N10_seed1 | 1000 | 4 | 210.0 +- 0.0 |" in text
    assert "SPQR minus baseline" not in E.return_table(estimates[:2])  # no comparison


def test_return_effects_and_table_with_normalised_scores():
    """Offline runs carry normalised scores: the effect on them beside the return's, and a
    score column; a comparison with an unscored run reports the return only."""

    def scored(run: str, mean: float) -> E.ReturnEstimate:
        return E.ReturnEstimate(run, 1000, 2, mean, 0.0, [mean] * 2, scores=[mean / 10] * 2)

    estimates = [
        ("beta0.0_N10", scored("r/beta0.0_N10_seed0", 100.0)),
        ("beta0.0_N10", scored("r/beta0.0_N10_seed1", 200.0)),
        ("beta1.0_N10", scored("r/beta1.0_N10_seed0", 130.0)),
        ("beta1.0_N10", scored("r/beta1.0_N10_seed1", 210.0)),
    ]
    (row,) = E.return_effects(estimates)
    assert row["diffs"] == [30.0, 10.0] and row["score_diffs"] == pytest.approx([3.0, 1.0])
    assert row["score_diff_mean"] == pytest.approx(2.0)
    assert (row["score_base_mean"], row["score_spqr_mean"]) == pytest.approx((15.0, 17.0))
    text = E.return_table(estimates)
    assert "| beta0.0_N10 | 2 | 150.0 +- 70.7 | 15.0 +- 7.1 | 2 |" in text
    assert "| N10 (beta 1), normalised score | 2 | 15.0 / 17.0 | +2.0 [" in text
    assert "| r/beta1.0_N10_seed1 | 1000 | 2 | 210.0 +- 0.0 | 21.0 |" in text
    assert E.return_rows(estimates)[0]["scores"] == "10.0;10.0"
    mixed = [*estimates[:3], ("beta1.0_N10", _est("r/beta1.0_N10_seed1", 210.0, 2))]
    (row,) = E.return_effects(mixed)
    assert "score_diffs" not in row and row["diffs"] == [30.0, 10.0]
    text = E.return_table(mixed)
    assert "| beta1.0_N10 | 2 | 170.0 +- 56.6 | n/a | 2 |" in text
    assert "normalised score |" not in text.split("| run |")[0].split("| comparison |")[1]
    assert E.return_rows(mixed)[3]["mean_score"] == ""
    # no scores at all: the table of online runs, unchanged
    assert "normalised" not in E.return_table([("a", _est("r/a_seed0", 1.0))])


def test_cli_evaluate_writes_the_table_and_the_csv(sota_run, tmp_path):
    """Two arms holding the same saved agent under beta 0 and beta 1 names: the same
    policy on the same seeded resets, so SPQR's paired effect is exactly 0."""
    from torchrl_spqr.analysis import cli

    runs = tmp_path / "runs"
    shutil.copytree(sota_run, runs / "beta1.0_N6_seed0")
    shutil.copytree(sota_run, runs / "beta0.0_N6_seed0")
    out = tmp_path / "out"
    cli.main([str(runs), "--evaluate", "2", "--evaluate-seed", "3", "--out", str(out)])
    text = (out / "evaluation.md").read_text()
    assert "`--evaluate 2`" in text and "| beta0.0_N6 | 1 |" in text
    assert "| 1 |" in text and "+0.0 [+0.0, +0.0] | +0.0 |" in text
    with (out / "evaluation.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == E.CSV_FIELDS and {int(r["episodes"]) for r in rows} == {2}
    assert rows[0]["returns"] == rows[1]["returns"]
    direct = E.checkpoint_return(sota_run, episodes=2, seed=3)
    assert [float(x) for x in rows[0]["returns"].split(";")] == pytest.approx(direct.returns)
    with pytest.raises(SystemExit):
        cli.main([str(runs), "--evaluate", "2", "--until", "40"])
    with pytest.raises(SystemExit):
        cli.main([str(runs), "--evaluate", "0"])
