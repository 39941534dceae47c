"""torchrl_spqr.analysis: run discovery and grouping, confidence bands, summary, figures, checkpoints."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
from torchrl_spqr import analysis  # noqa: E402
from torchrl_spqr.analysis import cli  # noqa: E402
from torchrl_spqr.functional import matrix_side  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FIELDS = ["frames", "updates", "train_return", "eval_return", "spqr_kl", "spqr_accept_rate"]

# eval_return at frames 1000, 2000, 3000 per seed; arm "beta1.0_N10" has 3 seeds, "beta0.0_N10" 2
EVALS = {
    "beta1.0_N10": {0: [10.0, 50.0, 100.0], 1: [20.0, 90.0, 130.0], 2: [30.0, 200.0, 160.0]},
    "beta0.0_N10": {0: [5.0, 40.0, 70.0], 1: [15.0, 30.0, 90.0]},
}


def _write_run(run: Path, evals: list[float], seed: int) -> None:
    run.mkdir(parents=True)
    with (run / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for i, ev in enumerate(evals):
            frames = 1000 * (i + 1)
            w.writerow(  # a log row without evaluation, then one with it
                {
                    "frames": frames - 500,
                    "updates": frames - 600,
                    "train_return": ev / 2,
                    "spqr_kl": 0.6 + 0.01 * seed,
                    "spqr_accept_rate": 0.95,
                }
            )
            w.writerow({"frames": frames, "updates": frames - 100, "eval_return": ev})


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A Hydra-like multirun folder ``multirun/sac_ens/Hopper-v5/<arm>_seed<k>/``."""
    root = tmp_path / "multirun" / "sac_ens" / "Hopper-v5"
    for arm, seeds in EVALS.items():
        for seed, evals in seeds.items():
            _write_run(root / f"{arm}_seed{seed}", evals, seed)
    (root / "beta1.0_N10_seed0" / "logs").mkdir()  # TorchRL logger output is not a run
    return root


def test_find_runs_discovers_and_groups_a_sweep(sweep):
    runs = analysis.find_runs([sweep])
    assert len(runs) == 5
    groups = analysis.group_runs([sweep])
    assert sorted(groups) == ["beta0.0_N10", "beta1.0_N10"]
    assert [r.name for r in groups["beta1.0_N10"]] == [f"beta1.0_N10_seed{k}" for k in range(3)]
    # from the multirun root the label keeps the algorithm and the environment
    top = analysis.group_runs([sweep.parents[1]])
    assert sorted(top) == ["sac_ens/Hopper-v5/beta0.0_N10", "sac_ens/Hopper-v5/beta1.0_N10"]
    # run folders given one by one group the same way
    one_by_one = analysis.group_runs(sorted(sweep.iterdir()))
    assert {k: len(v) for k, v in one_by_one.items()} == {"beta0.0_N10": 2, "beta1.0_N10": 3}


def test_find_runs_follows_links_to_run_folders_once(sweep, tmp_path):
    """A comparison folder of links to run folders from elsewhere (Path.rglob does not follow
    them before Python 3.13): arms come from the links' names; a link back up the tree and a
    second link to the same folder are walked once; a folder under a path named ``logs``
    is found."""
    compare = tmp_path / "logs" / "compare"  # "logs" above the root does not hide runs
    (compare / "spqr").mkdir(parents=True)
    for seed in range(3):
        (compare / "spqr" / f"seed{seed}").symlink_to(sweep / f"beta1.0_N10_seed{seed}")
    (compare / "spqr" / "zz_again").symlink_to(sweep / "beta1.0_N10_seed0")
    (compare / "base").symlink_to(sweep / "beta0.0_N10_seed0")
    (compare / "spqr" / "loop").symlink_to(compare)  # a cycle
    runs = analysis.find_runs([compare])
    assert len(runs) == 4
    assert {arm for _, arm in runs} == {"spqr", "base"}
    assert sorted(str(r.relative_to(compare)) for r, arm in runs if arm == "spqr") == [
        "spqr/seed0",
        "spqr/seed1",
        "spqr/seed2",
    ]


def test_hydra_numbered_subfolders_group_by_overrides(tmp_path):
    root = tmp_path / "multirun"
    for i, (beta, seed) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        run = root / str(i)
        _write_run(run, [1.0, 2.0, 3.0], seed)
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n- spqr.beta={beta}\n")
    groups = analysis.group_runs([root])
    assert {k: len(v) for k, v in groups.items()} == {"spqr.beta=0": 2, "spqr.beta=1": 2}


def test_group_curve_mean_and_t_band_match_a_hand_computation(sweep):
    from scipy import stats

    rows = [analysis.read_metrics(r) for r in analysis.group_runs([sweep])["beta1.0_N10"]]
    c = analysis.group_curve(rows, "eval_return")
    assert c.seeds == 3 and c.step_key == "frames" and not c.interpolated
    assert c.steps.tolist() == [1000, 2000, 3000]
    vals = np.array([EVALS["beta1.0_N10"][k] for k in range(3)])
    half = stats.t.ppf(0.975, 2) * vals.std(0, ddof=1) / math.sqrt(3)
    np.testing.assert_allclose(c.mean, vals.mean(0))
    np.testing.assert_allclose(c.lo, vals.mean(0) - half)
    np.testing.assert_allclose(c.hi, vals.mean(0) + half)


def test_group_curve_interpolates_runs_logged_at_different_steps():
    a = [{"frames": 0.0, "x": 0.0}, {"frames": 10.0, "x": 10.0}, {"frames": 20.0, "x": 20.0}]
    b = [{"frames": 5.0, "x": 0.0}, {"frames": 15.0, "x": 0.0}]
    c = analysis.group_curve([a, b], "x")
    assert c.interpolated and c.steps.tolist() == [5.0, 10.0, 15.0]
    np.testing.assert_allclose(c.mean, [2.5, 5.0, 7.5])


def test_bootstrap_band_is_seeded_and_brackets_the_mean():
    v = np.array([[1.0, 5.0], [2.0, 6.0], [4.0, 9.0], [3.0, 7.0]])
    m1, lo1, hi1 = analysis.mean_ci(v, method="bootstrap")
    m2, lo2, hi2 = analysis.mean_ci(v, method="bootstrap")
    assert np.array_equal(lo1, lo2) and np.array_equal(hi1, hi2)
    assert np.all(v.min(0) <= lo1) and np.all(lo1 < m1) and np.all(m1 < hi1)
    assert np.all(hi1 <= v.max(0))
    m, lo, hi = analysis.mean_ci(v[:1])  # one seed: no band
    assert np.array_equal(lo, m) and np.array_equal(hi, m)


def test_summary_numbers_match_a_hand_computation(sweep):
    from scipy import stats

    rows = {r["group"]: r for r in analysis.summary_rows(analysis.group_runs([sweep]))}
    a = rows["beta1.0_N10"]
    finals, bests = [100.0, 130.0, 160.0], [100.0, 130.0, 200.0]  # seed 2 peaks at 2000
    assert a["seeds"] == 3 and a["final"] == finals and a["best"] == bests
    assert a["final_mean"] == pytest.approx(130.0) and a["final_sd"] == pytest.approx(30.0)
    half = stats.t.ppf(0.975, 2) * 30.0 / math.sqrt(3)
    assert a["final_ci"] == pytest.approx((130.0 - half, 130.0 + half))
    assert a["best_mean"] == pytest.approx(np.mean(bests))
    assert a["best_sd"] == pytest.approx(np.std(bests, ddof=1))
    table = analysis.summary_table(analysis.group_runs([sweep]))
    line = next(ln for ln in table.splitlines() if ln.startswith("| beta1.0_N10 "))
    assert "| 3 | 3000 | 130.0 +- 30.0 |" in line
    assert f"[{130 - half:.1f}, {130 + half:.1f}]" in line
    b = rows["beta0.0_N10"]
    assert b["seeds"] == 2 and b["final_mean"] == pytest.approx(80.0)


def test_diagnostics_table_matches_a_hand_computation(sweep):
    groups = analysis.group_runs([sweep])
    rows = {r["group"]: r for r in analysis.diagnostics_rows(groups)}
    a = rows["beta1.0_N10"]
    # seed k logs spqr_kl = 0.6 + 0.01 k at every training row: run means 0.60, 0.61, 0.62
    assert a["spqr_kl"] == pytest.approx([0.60, 0.61, 0.62])
    assert a["spqr_kl_mean"] == pytest.approx(0.61) and a["spqr_kl_sd"] == pytest.approx(0.01)
    assert a["spqr_accept_rate_mean"] == pytest.approx(0.95) and "spqr_spike" not in a
    table = analysis.diagnostics_table(groups)
    line = next(ln for ln in table.splitlines() if ln.startswith("| beta1.0_N10 "))
    assert "| 3 | 0.6100 +- 0.0100 | 0.9500 +- 0.0000 |" in line
    assert "spike" not in table.splitlines()[0]  # no run logged it: no column
    # the last third of the rows: one row per run, same values here
    tail = {r["group"]: r for r in analysis.diagnostics_rows(groups, last_fraction=1 / 3)}
    assert tail["beta1.0_N10"]["spqr_kl"] == pytest.approx(a["spqr_kl"])
    with pytest.raises(ValueError, match="last_fraction"):
        analysis.diagnostics_rows(groups, last_fraction=0.0)
    per_seed = next(
        ln for ln in analysis.summary_table(groups).splitlines() if ln.startswith("| beta1.0_N10 ")
    )
    assert per_seed.endswith("| 100.0 / 100.0, 130.0 / 130.0, 160.0 / 200.0 |")


def test_paired_effects_match_a_hand_computation(sweep):
    groups = analysis.group_runs([sweep])
    assert analysis.effect_pairs(groups) == [("N10", 1.0, "beta0.0_N10", "beta1.0_N10")]
    (r,) = analysis.paired_effects(groups)
    assert r["seeds"] == [0, 1]  # seed 2 has no baseline run: left out
    # final: 100 - 70 and 130 - 90; best is the same here (both arms peak at the end)
    for name in ("final", "best"):
        assert r[f"{name}_base"] == pytest.approx(80.0)
        assert r[f"{name}_spqr"] == pytest.approx(115.0)
        assert r[f"{name}_diff_mean"] == pytest.approx(35.0)
        half = 12.706 * math.sqrt(50.0) / math.sqrt(2)  # t_{0.975,1} * sd / sqrt(2)
        lo, hi = r[f"{name}_diff_ci"]
        assert lo == pytest.approx(35.0 - half, rel=1e-3) and hi == pytest.approx(
            35.0 + half, rel=1e-3
        )
        assert r[f"{name}_rel_mean"] == pytest.approx(100 * 35.0 / 80.0)
        assert r[f"{name}_wins"] == 2
    assert r["accept_base"] == pytest.approx(0.95) and r["accept_spqr"] == pytest.approx(0.95)
    md = analysis.effects_table([r])
    assert "| N10 | 1 | 2 | 80.0 / 115.0 | +35.0 (+43.8%) [" in md


def test_until_reads_every_run_up_to_a_common_step(sweep):
    groups = analysis.group_runs([sweep])
    run = sweep / "beta1.0_N10_seed2"
    assert [r["frames"] for r in analysis.read_metrics(run, until=2000)] == [500, 1000, 1500, 2000]
    assert len(analysis.read_metrics(run)) == 6
    # at 2000 (and at 2500: the last evaluation at or before it is still the one at 2000)
    for until in (2000, 2500):
        rows = {r["group"]: r for r in analysis.summary_rows(groups, until=until)}
        a, b = rows["beta1.0_N10"], rows["beta0.0_N10"]
        assert a["final"] == [50.0, 90.0, 200.0] and a["best"] == [50.0, 90.0, 200.0]
        assert a["steps"] == [2000.0] * 3 and b["final"] == [40.0, 30.0]
        (eff,) = analysis.paired_effects(groups, until=until)
        assert eff["final_diff_mean"] == pytest.approx(35.0)  # (50 - 40 + 90 - 30) / 2
        assert eff["until"] == until
    (eff,) = analysis.paired_effects(groups, until=1000)
    assert eff["final_base"] == pytest.approx(10.0) and eff["final_spqr"] == pytest.approx(15.0)
    assert "read up to step 1000: final: last evaluation at or before it" in (
        analysis.effects_table([eff])
    )
    assert analysis.paired_effects(groups)[0]["until"] is None
    # comparisons read at their own steps: the footer names each row's, in row order
    mixed = [
        eff,
        analysis.paired_effects(groups, until=2000)[0],
        analysis.paired_effects(groups)[0],
    ]
    assert "every comparison's runs read up to its own step (1000, 2000, whole runs): final" in (
        analysis.effects_table(mixed)
    )
    assert "best: maximum over the run" in analysis.effects_table(analysis.paired_effects(groups))
    table = analysis.summary_table(groups, until=2000)
    line = next(ln for ln in table.splitlines() if ln.startswith("| beta1.0_N10 "))
    assert (
        f"| 3 | 2000 | {np.mean([50, 90, 200]):.1f} +- {np.std([50, 90, 200], ddof=1):.1f} |"
        in (line)
    )


def test_diagnostics_until(tmp_path):
    rows = _evals([1.0, 2.0, 3.0])
    for r, kl in zip(rows, (0.5, 0.7, 0.9)):
        r["spqr_kl"] = kl
    run = _write_rows(tmp_path / "a_seed0", rows)
    groups = {"a": [run]}
    for until, kl in ((None, 0.7), (2000, 0.6), (2999, 0.6), (1000, 0.5)):
        (row,) = analysis.diagnostics_rows(groups, until=until)
        assert row["spqr_kl"] == pytest.approx([kl])
    assert "0.6000" in analysis.diagnostics_table(groups, until=2000)


def test_figures_until(sweep, tmp_path, monkeypatch):
    from torchrl_spqr.analysis import figures

    seen = []
    monkeypatch.setattr(figures, "_panels", lambda rows, *a, **k: seen.append(rows))
    groups = analysis.group_runs([sweep])
    for until, last in ((None, 3000), (2000, 2000)):
        seen.clear()
        analysis.plot_learning_curves(groups, tmp_path / "lc", until=until)
        analysis.plot_diagnostics(groups, tmp_path / "d", until=until)
        analysis.plot_groups([sweep], tmp_path / "g", until=until)
        assert len(seen) == 3
        for rows_by_group in seen:
            assert {
                max(r["frames"] for r in rows) for g in rows_by_group.values() for rows in g
            } == {last}


def test_check_run_with_until_skips_runs_that_stopped_before_it(sweep):
    run = sweep / "beta1.0_N10_seed0"  # rows at frames 500 .. 3000
    assert analysis.check_run(run, "eval_return", until=3000) == (None, None)
    skip, _ = analysis.check_run(run, "eval_return", until=3001)
    assert skip == "it stopped before frames 3001 (its last row: frames 3000)"
    skip, _ = analysis.check_run(run, "eval_return", until=600)  # only the row at 500
    assert skip == "no eval_return logged in its 1 rows up to frames 600"


def test_cli_until(sweep, tmp_path, capsys):
    out, eff = tmp_path / "at2k", tmp_path / "eff"
    cli.main([str(sweep), "--until", "2000", "--out", str(out), "--effects", str(eff)])
    summary = (out / "summary.md").read_text()
    assert summary.startswith("Every run read up to step 2000 (`--until`).")
    assert "| beta1.0_N10 | 3 | 2000 | 113.3 +- " in summary
    eff_md = eff.with_suffix(".md").read_text()
    assert "--until 2000" in eff_md.splitlines()[0] and "| N10 | 1 | 2 | 35.0 / 70.0 |" in eff_md
    assert (out / "learning_curves.png").exists()
    # the runs stop at 3000: none is left at 5000, and each is named
    with pytest.raises(SystemExit) as exc:
        cli.main([str(sweep), "--until", "5000", "--out", str(tmp_path / "none")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("it stopped before frames 5000 (its last row: frames 3000)") == 5
    assert "no run left to report --key eval_return" in err


def test_effect_pairs_need_arms_that_differ_only_by_beta(tmp_path):
    for name in ("sac_beta0_N10", "sac_beta1_N10", "sac_beta1_N3", "redq_beta0.5_N10", "x_beta0"):
        _write_run(tmp_path / f"{name}_seed0", [1.0, 2.0], 0)
    for i, beta in enumerate((0, 10)):  # Hydra multirun folders: arms named by overrides
        run = tmp_path / "multirun" / str(i)
        _write_run(run, [1.0, 2.0], 0)
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text(f"- seed=0\n- spqr.beta={beta}\n")
    for beta in (0, 1):  # a population per arm: hydra.run.dir=pop/beta<b>, runs beta<b>.0_N10
        _write_run(tmp_path / "pop" / f"beta{beta}" / f"beta{beta}.0_N10_seed0", [1.0, 2.0], 0)
    pairs = analysis.effect_pairs(analysis.group_runs([tmp_path]))
    # N3 and redq have no beta-0 twin; multirun's arms differ only by spqr.beta
    assert sorted(pairs) == [
        ("multirun/spqr", 10.0, "multirun/spqr.beta=0", "multirun/spqr.beta=10"),
        ("pop/N10", 1.0, "pop/beta0/beta0.0_N10", "pop/beta1/beta1.0_N10"),
        ("sac_N10", 1.0, "sac_beta0_N10", "sac_beta1_N10"),
    ]
    # the run's own name holds its beta (the last beta part), whatever its folder says
    assert analysis.effect_pairs({"b0/beta0.0_N10": [], "b0/beta2_N10": []}) == [
        ("b0/N10", 2.0, "b0/beta0.0_N10", "b0/beta2_N10")
    ]


def _two_seed_folders(tmp_path: Path) -> tuple[Path, Path]:
    """``old/arms`` (seeds 0-1 of EVALS) and ``new/arms`` (seed 2 of beta 1 and seed 2 of beta
    0, evaluations of seed 1 plus 10): the layout of a comparison and its later seeds."""
    old, new = tmp_path / "old" / "arms", tmp_path / "new" / "arms"
    for arm, seeds in EVALS.items():
        for seed in (0, 1):
            _write_run(old / f"{arm}_seed{seed}", seeds[seed], seed)
    _write_run(new / "beta1.0_N10_seed2", EVALS["beta1.0_N10"][2], 2)
    _write_run(new / "beta0.0_N10_seed2", [v + 10 for v in EVALS["beta0.0_N10"][1]], 2)
    return old, new


def test_pool_names_arms_relative_to_each_folder(tmp_path):
    old, new = _two_seed_folders(tmp_path)
    apart = analysis.group_runs([old, new])  # relative to the common parent: four arms
    assert sorted(apart) == [f"{f}/arms/{arm}" for f in ("new", "old") for arm in sorted(EVALS)]
    pooled = analysis.group_runs([old, new], pool=True)
    assert {arm: [analysis.seed_of(r) for r in runs] for arm, runs in pooled.items()} == {
        "beta0.0_N10": [0, 1, 2],
        "beta1.0_N10": [0, 1, 2],
    }
    # the same as one folder holding all six runs
    both = tmp_path / "both"
    both.mkdir()
    for run in [*old.iterdir(), *new.iterdir()]:
        (both / run.name).symlink_to(run)
    (eff,) = analysis.paired_effects(pooled)
    (eff_both,) = analysis.paired_effects(analysis.group_runs([both]))
    assert eff["seeds"] == eff_both["seeds"] == [0, 1, 2]
    assert eff["final_diff_mean"] == pytest.approx(eff_both["final_diff_mean"])
    # (100 - 70) + (130 - 90) + (160 - 100), over three seeds
    assert eff["final_diff_mean"] == pytest.approx((30 + 40 + 60) / 3)
    # a run folder given itself is named by its own folder name
    one = analysis.group_runs([old / "beta0.0_N10_seed0", new], pool=True)
    assert sorted(one) == ["beta0.0_N10", "beta1.0_N10"] and len(one["beta0.0_N10"]) == 2


def test_pool_refuses_an_arm_with_a_seed_twice(tmp_path):
    old, _ = _two_seed_folders(tmp_path)
    again = tmp_path / "again" / "arms"
    _write_run(again / "beta0.0_N10_seed1", [1.0, 2.0, 3.0], 1)
    with pytest.raises(ValueError, match="'beta0.0_N10' has two runs with seed 1"):
        analysis.find_runs([old, again], pool=True)
    assert len(analysis.find_runs([old, again])) == 5  # apart, the arms differ


def test_runs_by_seed_and_paired_effects_refuse_a_repeated_seed(tmp_path):
    runs = [Path("a/x_seed0"), Path("b/x_seed1"), Path("c/x_nosead")]
    assert analysis.runs_by_seed(runs) == {0: runs[0], 1: runs[1]}
    assert analysis.runs_by_seed(["a/x_seed3"]) == {3: "a/x_seed3"}  # returned as given
    with pytest.raises(
        ValueError, match="arm 'x' has two runs with seed 0: a/x_seed0 and c/x_seed0"
    ):
        analysis.runs_by_seed([Path("a/x_seed0"), Path("c/x_seed0")], "x")
    # effects used to keep the last of two runs of one seed without a word
    old, new = _two_seed_folders(tmp_path)
    groups = analysis.group_runs([old, new], pool=True)
    groups["beta0.0_N10"].append(new / "beta0.0_N10_seed2")
    with pytest.raises(ValueError, match="two runs with seed 2"):
        analysis.paired_effects(groups)


def test_cli_pool(tmp_path, capsys):
    old, new = _two_seed_folders(tmp_path)
    out, eff = tmp_path / "pooled", tmp_path / "eff"
    cli.main([str(old), str(new), "--pool", "--out", str(out), "--effects", str(eff)])
    assert "| beta1.0_N10 | 3 |" in (out / "summary.md").read_text()
    eff_md = eff.with_suffix(".md").read_text()
    assert "--pool" in eff_md.splitlines()[0] and "| N10 | 1 | 3 |" in eff_md
    _write_run(tmp_path / "again" / "beta1.0_N10_seed0", [1.0, 2.0, 3.0], 0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main([str(old), str(tmp_path / "again"), "--pool", "--out", str(out)])
    assert exc.value.code == 2 and "two runs with seed 0" in capsys.readouterr().err


def test_cli_effects_only(sweep, tmp_path):
    eff = tmp_path / "eff"
    cli.main([str(sweep), "--effects", str(eff), "--effects-only"])
    assert eff.with_suffix(".png").exists() and eff.with_suffix(".md").exists()
    assert not (sweep / "plots").exists()  # no curves, no summary
    with pytest.raises(SystemExit):
        cli.main([str(sweep), "--effects-only"])


def test_cli_writes_png_svg_and_summary(sweep, tmp_path, capsys):
    out = tmp_path / "figs"
    cmp = tmp_path / "cmp"
    argv = [str(sweep), "--format", "png", "svg", "--out", str(out), "--ci", "bootstrap"]
    cli.main([*argv, "--compare", str(cmp), "--effects", str(tmp_path / "eff" / "effects")])
    for name in ("learning_curves", "diagnostics"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        svg = (out / f"{name}.svg").read_text()
        assert "<svg" in svg and "bootstrap" in svg  # the band's method is in the caption
    assert (tmp_path / "cmp.png").exists() and (tmp_path / "cmp.svg").exists()  # legacy --compare
    assert (tmp_path / "eff" / "effects.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    eff_md = (tmp_path / "eff" / "effects.md").read_text()
    assert (
        eff_md.startswith("Written by `python -m torchrl_spqr.analysis ")
        and "| N10 | 1 | 2 |" in eff_md
    )
    summary = (out / "summary.md").read_text()
    assert "| beta1.0_N10 | 3 |" in summary and "| beta0.0_N10 | 2 |" in summary
    assert "SPQR diagnostics during training" in summary and "0.6100 +- 0.0100" in summary
    printed = capsys.readouterr().out
    assert "learning_curves.svg" in printed and "| beta1.0_N10 | 3 |" in printed
    # default output folder: <sweep>/plots for a sweep, the run folder for one run
    assert cli._default_out([sweep]) == sweep / "plots"
    run = sweep / "beta1.0_N10_seed0"
    assert cli._default_out([run]) == run
    assert cli._default_out([run, sweep / "beta0.0_N10_seed1"]) == sweep / "plots"


@pytest.mark.parametrize(
    "module",
    # the old name is a thin alias: its subprocess (about 11 s) runs with the slow tests
    ["torchrl_spqr.analysis", pytest.param("torchrl_spqr.plot", marks=pytest.mark.slow)],
)
def test_command_line_under_its_new_and_its_old_name(module, sweep, tmp_path):
    """``python -m torchrl_spqr.plot`` (the old command) still runs, without a FutureWarning."""
    eff = tmp_path / "eff"
    argv = [str(sweep), "--effects", str(eff), "--effects-only"]
    res = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-m", module, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FutureWarning" not in res.stderr, res.stderr[-3000:]
    assert eff.with_suffix(".md").read_text().startswith(f"Written by `python -m {module} ")


# ------------------------------------------------------------ checkpoints


def _check_spectrum_invariant(q: torch.Tensor) -> None:
    from torchrl_spqr.functional import spqr_eigenvalues

    d = matrix_side(q.shape[0])
    eig = spqr_eigenvalues(q.double())
    torch.testing.assert_close(eig.pow(2).sum(-1), torch.full_like(eig[:, 0], (d * d - 1) / d))


def test_checkpoint_batch_from_buffer_and_from_rollout(sota_run):
    b = analysis.checkpoint_q_values(sota_run, batch_size=32)
    assert b.q.shape == (6, 32) and torch.isfinite(b.q).all()
    assert "replay buffer" in b.source and b.pairs == "next_policy"
    assert (b.filling, b.density, b.rho, b.eps) == ("ordered", "paper", 0.5, 0.01)
    _check_spectrum_invariant(b.q)
    r = analysis.checkpoint_q_values(sota_run, batch_size=500, source="rollout", rollout_steps=50)
    assert r.q.shape == (6, 50) and "rollout" in r.source
    # "data" pairs evaluate the critics at stored actions: another batch, same members
    dq = analysis.checkpoint_q_values(sota_run, batch_size=32, pairs="data")
    assert dq.q.shape == (6, 32) and not torch.equal(dq.q, b.q)
    # the one vmapped call gives each member's own Q-values (a loop over the members)
    from torchrl_spqr.training.restore import load_agent

    with load_agent(sota_run) as agent:
        net, params = agent.base.qvalue_network, agent.base.qvalue_network_params.detach()
        loop = []
        for i in range(6):
            with torch.no_grad(), params[i].to_module(net):
                loop.append(net(dq.inputs.clone()).get(net.out_keys[0]).reshape(-1))
    torch.testing.assert_close(dq.q, torch.stack(loop))


def test_cli_checkpoint_figures(sota_run, tmp_path):
    out = tmp_path / "ck"
    cli.main([str(sota_run), "--checkpoint", "--batch-size", "40", "--out", str(out)])
    for name in ("spectrum", "correlation"):
        png = out / f"{name}_{sota_run.name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"examples/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script", ["spqr_demo", "redq_spqr"])
def test_example_checkpoints_are_supported(script, tmp_path):
    """The examples save {"actor", "loss"} to checkpoint.pt; their settings live in the name."""
    from torchrl.objectives import SACLoss

    from torchrl_spqr import QEnsemble, SPQRLoss, make_q_member
    from torchrl_spqr.objectives import ReferenceREDQLoss

    ex = _load_example(script)
    env = ex.make_env("Pendulum-v1", 0)
    actor = ex.make_actor(env, 8)
    critics = QEnsemble(lambda: make_q_member(4, num_cells=(8, 8)), 3)
    if script == "spqr_demo":
        base = SACLoss(actor, critics.members(), num_qvalue_nets=3, action_spec=env.action_spec)
        base.make_value_estimator(gamma=0.99)
        base.target_entropy  # registered lazily at the first update, as in a real checkpoint
        run = tmp_path / "spqr_sac_ens_Pendulum-v1_N3_beta1_seed0"
    else:
        base = ReferenceREDQLoss(
            actor, critics, sub_sample_len=2, policy_update_delay=5, target_entropy=-0.5
        )
        run = tmp_path / "redq_spqr_Pendulum-v1_N3_M2_G5_beta1_seed0"
    loss = SPQRLoss(base, beta=1.0)
    run.mkdir()
    torch.save({"actor": actor.state_dict(), "loss": loss.state_dict()}, run / "checkpoint.pt")
    b = analysis.checkpoint_q_values(run, batch_size=30, rollout_steps=30)
    assert b.q.shape == (3, 30) and "rollout" in b.source and script in b.meta["algorithm"]
    # the saved critics, not freshly initialised ones
    torch.testing.assert_close(b.q, critics.q_values(b.inputs))
    paths = analysis.plot_spectrum(b, tmp_path / "spec")
    assert paths[0].exists()


def test_checkpoint_errors_are_explicit(tmp_path):
    bad = tmp_path / "renamed_run"
    bad.mkdir()
    torch.save({"actor": {}, "loss": {}}, bad / "checkpoint.pt")
    with pytest.raises(ValueError, match="spqr_sac_ens_<env>_N<N>"):
        analysis.checkpoint_q_values(bad)
    with pytest.raises(FileNotFoundError, match="checkpoint/state.pt"):
        analysis.checkpoint_q_values(tmp_path)


# ------------------------------------------------------------ bad inputs


def _write_rows(run: Path, rows: list[dict]) -> Path:
    run.mkdir(parents=True)
    with (run / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return run


def _evals(values: list[float]) -> list[dict]:
    return [
        {"frames": 1000 * (i + 1), "updates": 900 * (i + 1), "eval_return": v, "spqr_kl": 0.6}
        for i, v in enumerate(values)
    ]


def test_run_ending_in_nan_reports_nan_final_not_an_earlier_value(tmp_path):
    root = tmp_path / "sweep"
    _write_run(root / "beta0_N10_seed0", [5.0, 40.0, 70.0], 0)
    _write_run(root / "beta0_N10_seed1", [15.0, 30.0, 90.0], 1)
    _write_run(root / "beta1_N10_seed0", [10.0, 50.0, 100.0], 0)
    _write_rows(root / "beta1_N10_seed1", _evals([20.0, 90.0, math.nan, math.nan]))
    out = analysis.run_outcome(analysis.read_metrics(root / "beta1_N10_seed1"), "eval_return")
    assert math.isnan(out["final"]) and out["final_step"] == 4000
    assert out["diverged_at"] == 3000 and out["best"] == 90.0 and out["nonfinite"] == 2
    groups = analysis.group_runs([root])
    rows = {r["group"]: r for r in analysis.summary_rows(groups)}
    spqr = rows["beta1_N10"]
    assert spqr["final"][0] == 100.0 and math.isnan(spqr["final"][1])  # never 90.0
    assert math.isnan(spqr["final_mean"]) and spqr["best"] == [100.0, 90.0]
    assert spqr["diverged_at"] == [None, 3000] and spqr["steps"] == [3000, 4000]
    table = analysis.summary_table(groups)
    line = next(ln for ln in table.splitlines() if ln.startswith("| beta1_N10 "))
    assert "NaN (1 of 2 diverged)" in line and "NaN (diverged at step 3000) / 90.0" in line
    assert "Diverged" in table and "beta1_N10_seed1 (from step 3000)" in table
    # the paired effect: that seed's final is NaN, so is the comparison's final difference
    (eff,) = analysis.paired_effects(groups)
    assert math.isnan(eff["final_spqr"]) and math.isnan(eff["final_diff_mean"])
    assert eff["best_diff_mean"] == pytest.approx(((100 - 70) + (90 - 90)) / 2)
    assert eff["diverged"] == [(1, "beta1_N10", 3000)]
    md = analysis.effects_table([eff])
    assert "NaN (a run diverged)" in md and "beta1_N10 seed 1 (from step 3000)" in md
    stats = analysis.run_effect_stats(root / "beta1_N10_seed1", "eval_return")
    assert math.isnan(stats[0]) and stats[1] == 90.0 and stats[3] == 3000


def test_nan_in_the_middle_keeps_the_last_finite_final(tmp_path):
    run = _write_rows(tmp_path / "r", _evals([1.0, math.nan, 3.0]))
    out = analysis.run_outcome(analysis.read_metrics(run), "eval_return")
    assert out["final"] == 3.0 and out["diverged_at"] is None and out["nonfinite"] == 1


def test_cli_reports_header_only_and_all_nan_runs(sweep, tmp_path, capsys):
    header_only = _write_rows(sweep / "beta1.0_N10_seed7", [])
    empty = sweep / "beta1.0_N10_seed8"
    empty.mkdir()
    (empty / "metrics.csv").write_text("")
    all_nan = _write_rows(sweep / "beta0.0_N10_seed5", _evals([math.nan, math.nan]))
    out = tmp_path / "figs"
    cli.main([str(sweep), "--out", str(out)])
    err = capsys.readouterr().err
    assert f"skipped {header_only}: metrics.csv has a header but no rows" in err
    assert f"skipped {empty}: metrics.csv is empty" in err
    assert f"warning: {all_nan}: all 2 values of eval_return are NaN/inf" in err
    summary = (out / "summary.md").read_text()
    assert "| beta1.0_N10 | 3 |" in summary  # the two skipped runs are not counted
    line = next(ln for ln in summary.splitlines() if ln.startswith("| beta0.0_N10 "))
    assert "| 3 |" in line and "NaN (1 of 3 diverged)" in line  # the all-NaN run is
    assert "NaN (diverged at step 1000) / nan" in line


def test_cli_refuses_when_no_run_is_left(tmp_path, capsys):
    _write_rows(tmp_path / "a_seed0", [])
    _write_rows(tmp_path / "b_seed0", [{"frames": 10, "updates": 5, "spqr_kl": 0.6}])
    with pytest.raises(SystemExit) as exc:
        cli.main([str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "skipped" in err and "no eval_return logged" in err
    assert "no run left to report --key eval_return" in err and "spqr_kl" in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--level", "1.5"], "(0, 1)"),
        (["--level", "0"], "(0, 1)"),
        (["--level", "-0.5"], "(0, 1)"),
        (["--level", "abc"], "(0, 1)"),
        (["--ci", "jackknife"], "invalid choice"),
        (["--smooth", "0"], "--smooth"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--key", "no_such_metric"], "no run left to report --key no_such_metric"),
        (["--effects-only"], "--effects-only needs --effects"),
        (["--until", "0"], "expected a step count > 0"),
        (["--until", "-5"], "expected a step count > 0"),
        (["--until", "nan"], "expected a step count > 0"),
        (["--until", "50k"], "expected a step count > 0"),
        (["--until", "2000", "--per-run"], "--until cannot be combined with --per-run"),
        (["--until", "2000", "--checkpoint"], "--until cannot be combined with --per-run"),
    ],
)
def test_cli_bad_arguments_are_clear_errors(sweep, argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([str(sweep), *argv])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (sweep / "plots").exists()


def test_cli_bad_paths_are_clear_errors(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main([str(tmp_path / "nope")])
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        cli.main([str(tmp_path / "empty")])
    assert "No run folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        cli.main([str(sweep), "--out", str(tmp_path / "file")])
    assert "is a file" in capsys.readouterr().err


def test_mean_ci_rejects_a_level_outside_0_1():
    for level in (1.5, 0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
            analysis.mean_ci([1.0, 2.0, 3.0], level)
    with pytest.raises(ValueError, match="method"):
        analysis.mean_ci([1.0], method="jackknife")  # also with one seed


def test_plot_run_without_matplotlib(sweep, monkeypatch):
    """A training script's ``plot_run(run, missing_ok=True)`` skips the figure, not the run."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    run = sweep / "beta1.0_N10_seed0"
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert analysis.plot_run(run, missing_ok=True) == []
    with pytest.raises(ImportError, match="matplotlib"):
        analysis.plot_run(run)
    assert not (run / "learning_curve.png").exists()


def test_learning_curves_at_exit_draws_at_every_exit(sweep, tmp_path, capsys):
    """The scripts' loop wrapper: the figure after a normal exit and after a stop or an
    error (which propagates unchanged); a failure to draw is raised after a normal exit and
    reported in one line after an exception, which then keeps its type."""
    runs = [sweep / "beta0.0_N10_seed0", sweep / "beta1.0_N10_seed0"]
    with analysis.learning_curves_at_exit(*runs):
        pass
    assert all((r / "learning_curve.png").exists() for r in runs)
    for exc in (KeyboardInterrupt, RuntimeError):
        for r in runs:
            (r / "learning_curve.png").unlink()
        with pytest.raises(exc, match="in the loop"), analysis.learning_curves_at_exit(*runs):
            raise exc("in the loop")
        assert all((r / "learning_curve.png").exists() for r in runs)
    missing = tmp_path / "no_metrics"
    missing.mkdir()
    # the stop propagates, not the drawing's error
    with (
        pytest.raises(KeyboardInterrupt, match="stop"),
        analysis.learning_curves_at_exit(missing, runs[0]),
    ):
        raise KeyboardInterrupt("stop")
    err = capsys.readouterr().err
    assert f"warning: no learning curve drawn in {missing}" in err and err.count("\n") == 1
    # after a normal exit the drawing's error is raised
    with (
        pytest.raises(FileNotFoundError, match="metrics.csv"),
        analysis.learning_curves_at_exit(missing),
    ):
        pass
