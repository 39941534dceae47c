"""The experiment scripts in experiments/: each runs on a tiny setting and writes its CSV.

Also: the problems' true Q-values are right, and the write-up's tables are the ones
the committed CSVs give.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXP = ROOT / "experiments"
sys.path.insert(0, str(EXP))

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("EXPERIMENTS_QUIET", "1")


def _load(name: str):
    return importlib.import_module(name)


def _rows(path: Path) -> list[dict]:
    return _load("exp_common").read_csv(path)


def test_semicircle_tiny(tmp_path):
    sc = _load("semicircle")
    path = sc.main(["--tiny", "--seeds", "0", "--out", str(tmp_path)])
    rows = _rows(path)
    assert {
        "case",
        "d",
        "ks_pooled",
        "kl_binned",
        "ks_per_matrix",
        "frac_outside",
        "spqr_kl_paper",
    } <= set(rows[0])
    assert len(rows) == 3 * 6  # three cases x six d
    by = {(r["case"], r["d"]): r for r in rows}
    for case in ("goe_classic", "goe", "iid"):
        # the pooled ESD approaches the semicircle as d grows (generous margins)
        assert by[(case, 20)]["ks_pooled"] < 0.6 * by[(case, 2)]["ks_pooled"]
        assert by[(case, 20)]["kl_binned"] < by[(case, 2)]["kl_binned"]
    for case in ("goe", "iid"):
        for d in (2, 3, 4):  # package normalisation: sum of squared eigenvalues (d^2-1)/d
            assert by[(case, d)]["frac_outside"] == 0
            assert by[(case, d)]["second_moment"] == pytest.approx((d * d - 1) / d**2, rel=1e-4)
    # the paper density rewards a diagonal outlier once it leaves [-2, 2] (N = 21), the corrected one penalises it
    out = _rows(tmp_path / "semicircle_outlier.csv")
    kl = {(r["kind"], r["N"], r["theta"], r["density"]): r["spqr_kl"] for r in out}
    assert kl[("outlier_diag", 21, 10.0, "paper")] < kl[("outlier_diag", 21, 0.0, "paper")]
    assert kl[("outlier_diag", 21, 10.0, "corrected")] > kl[("outlier_diag", 21, 0.0, "corrected")]
    for name in ("convergence", "finite_d", "density"):
        assert (tmp_path / f"semicircle_{name}.png").stat().st_size > 10_000


def test_semicircle_cdf_and_kl_binned():
    sc = _load("semicircle")
    x = torch.tensor([-2.5, -2.0, 0.0, 2.0, 3.0], dtype=torch.float64)
    assert sc.semicircle_cdf(x).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    # exact semicircle quantiles: KS and binned KL near 0
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    grid = torch.linspace(-2, 2, 200001, dtype=torch.float64)
    q = grid[torch.searchsorted(sc.semicircle_cdf(grid), u).clamp(max=grid.numel() - 1)]
    assert sc.ks_pooled(q.view(-1, 1)) < 1e-3
    assert sc.kl_binned(q.view(-1, 1)) < 1e-3


def test_toy_truths():
    tp = _load("toy_problems")
    chain = tp.ChainMDP(seed=0)
    s = torch.arange(chain.k)
    a = torch.full((chain.k,), chain.pi_a)
    # V^pi(s) = Q^pi(s, pi(s)) solves the Bellman equation
    assert torch.allclose(chain.q_state(s, a), chain.v, atol=1e-5)
    bandit = tp.ContextualBandit(seed=0)
    obs = torch.rand(64, 3) * 2 - 1
    best = bandit.q_true(obs, bandit.mu(obs))
    other = bandit.q_true(obs, (bandit.mu(obs) + 0.3).clamp(-1, 1))
    assert bool((best >= other).all())
    assert bandit.greedy.q_true.shape == (256, 81)


def test_ensemble_metrics_null():
    tp = _load("toy_problems")
    torch.manual_seed(0)
    q_true = torch.randn(2048)
    m = tp.ensemble_metrics(q_true + 0.1 * torch.randn(10, 2048), q_true)
    assert abs(m["err_corr"]) < 0.05
    assert m["resid_corr"] == pytest.approx(-1 / 9, abs=0.02)
    assert 0.9 < m["accept"] <= 1.0
    common = q_true + 0.1 * torch.randn(1, 2048) + 0.02 * torch.randn(10, 2048)
    m2 = tp.ensemble_metrics(common, q_true)
    assert m2["err_corr"] > 0.9  # visible against the truth...
    assert m2["resid_corr"] == pytest.approx(-1 / 9, abs=0.02)  # ...invisible without it


@pytest.mark.parametrize("script", ["beta_sweep", "ensemble_size"])
def test_toy_scripts_tiny(script, tmp_path):
    mod = _load(script)
    args = ["--tiny", "--seeds", "0", "--out", str(tmp_path)]
    args += ["--betas", "0", "10"] if script == "beta_sweep" else ["--sizes", "3", "--betas", "10"]
    path = mod.main(args)
    rows = _rows(path)
    assert len(rows) == 4  # two problems x two betas (or x two arms)
    for col in (
        "problem",
        "N",
        "beta",
        "seed",
        "greedy_regret",
        "grad_ratio",
        "uniform_bias_min",
        "grid_spqr_kl",
    ):
        assert col in rows[0]
    for r in rows:
        ev = "uniform" if r["problem"] == "bandit" else "grid"
        assert math.isfinite(r[f"{ev}_bias_min"]) and r[f"{ev}_spread"] > 0
        assert 0 <= r[f"{ev}_accept"] <= 1
    assert path.with_suffix(".png").stat().st_size > 10_000
    # a second call re-uses the cache and gives the same rows
    assert _rows(mod.main(args)) == rows
    # --plot-only redraws the figure from the CSV without running anything
    (tmp_path / ".cache" / "toy_runs.jsonl").unlink()
    path.with_suffix(".png").unlink()
    assert _rows(mod.main([*args, "--plot-only"])) == rows
    assert path.with_suffix(".png").stat().st_size > 10_000
    assert not (tmp_path / ".cache" / "toy_runs.jsonl").exists()


def test_ensemble_size_hopper_tiny(tmp_path, monkeypatch):
    pytest.importorskip("minari")
    pytest.importorskip("hydra")
    from torchrl_spqr.data import build_dataset

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    build_dataset(
        "local/test/exp-hopper-v0",
        "Hopper-v5",
        "random",
        steps=300,
        seed=0,
        max_episode_steps=50,
        ref_max_score=1000.0,
    )
    mod = _load("ensemble_size_hopper")
    args = [
        "--tiny",
        "--sizes",
        "3",
        "--out",
        str(tmp_path),
        "--runs",
        str(tmp_path / "runs"),
        "--dataset",
        "local/test/exp-hopper-v0",
    ]
    path = mod.main(args)
    rows = _rows(path)
    assert [(r["N"], r["beta"]) for r in rows] == [(3, 0), (3, 10)]
    for r in rows:
        assert math.isfinite(r["final_return"]) and math.isfinite(r["spqr_kl_2nd_half"])
    curves = _rows(tmp_path / "ensemble_size_hopper_curves.csv")
    assert {r["run"] for r in curves} == {"N3_beta0_paper_seed0", "N3_beta10_paper_seed0"}
    assert (tmp_path / "ensemble_size_hopper.png").exists()


def test_spectral_vs_direct_tiny(tmp_path):
    mod = _load("spectral_vs_direct")
    path = mod.main(
        [
            "--tiny",
            "--seeds",
            "0",
            "--sizes",
            "10",
            "--out",
            str(tmp_path),
            "--runs-from",
            str(EXP / "results"),
        ]
    )
    rows = _rows(path)
    assert len(rows) == 4 * 3  # four kinds x three strengths
    by = {(r["kind"], r["strength"]): r for r in rows}
    # a common error is seen against the truth only
    assert by[("common", 0.9)]["err_corr"] > 0.8
    assert by[("common", 0.9)]["resid_corr"] == pytest.approx(
        by[("common", 0.0)]["resid_corr"], abs=0.05
    )
    assert by[("common", 0.9)]["accept"] > 0.85
    # two clusters: the MP ratio sees them, the N = 10 spectral test does not reject more
    assert by[("clusters", 0.9)]["mp_ratio"] > 2 * by[("clusters", 0.0)]["mp_ratio"]
    assert by[("clusters", 0.9)]["accept"] > 0.9
    # one much noisier member (on the diagonal): the spectral test rejects it
    assert by[("outlier", 0.9)]["accept"] < by[("outlier", 0.0)]["accept"] - 0.05


def test_spearman():
    mod = _load("spectral_vs_direct")
    assert mod.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert mod.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert mod.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)


def test_readme_tables_come_from_committed_csvs():
    """Every table in experiments/README.md is what make_tables.py renders from results/."""
    mt = _load("make_tables")
    text = (EXP / "README.md").read_text()
    blocks = mt._BLOCK.findall(text)
    assert sorted(b[0] for b in blocks) == sorted(mt.TABLES)
    assert mt.render_readme(text) == text


def test_results_committed():
    for name in (
        "semicircle_convergence",
        "semicircle_finite_d",
        "semicircle_outlier",
        "beta_sweep",
        "ensemble_size",
        "ensemble_size_hopper",
        "spectral_vs_direct_synthetic",
        "spectral_vs_direct_runs",
    ):
        assert (EXP / "results" / f"{name}.csv").exists(), name
    for png in (EXP / "results").glob("*.png"):
        assert png.stat().st_size > 10_000
    assert os.path.getsize(EXP / "README.md") > 2000
