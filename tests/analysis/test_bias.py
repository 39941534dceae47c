"""torchrl_spqr.analysis.bias: Q bias against Monte Carlo returns (REDQ's test)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from torchrl_spqr.analysis import bias as B


def _brute_soft_returns(r, lp, gamma, alpha):
    """``G_t = sum_k gamma^k r_{t+k} - alpha * sum_{k>=1} gamma^k lp_{t+k}``, term by term."""
    T = len(r)
    return [
        sum(gamma**k * r[t + k] for k in range(T - t))
        - alpha * sum(gamma**k * lp[t + k] for k in range(1, T - t))
        for t in range(T)
    ]


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_soft_returns_match_the_term_by_term_sum(alpha):
    gen = torch.Generator().manual_seed(0)
    r, lp = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    got = B.soft_discounted_returns(r, lp, gamma=0.97, alpha=alpha)
    want = torch.tensor(_brute_soft_returns(r.tolist(), lp.tolist(), 0.97, alpha))
    torch.testing.assert_close(got, want.double())
    assert got[-1] == r[-1].double()  # the last step: its reward only
    # the action at t itself carries no entropy term in Q(s_t, a_t)
    lp2 = lp.clone()
    lp2[0] += 100.0
    torch.testing.assert_close(B.soft_discounted_returns(r, lp2, 0.97, alpha), got)


def test_soft_returns_refuse_bad_input():
    with pytest.raises(ValueError, match="one entry per step"):
        B.soft_discounted_returns(torch.zeros(5), torch.zeros(4), 0.99)
    with pytest.raises(ValueError, match="gamma must be in"):
        B.soft_discounted_returns(torch.zeros(5), torch.zeros(5), 1.5)


def test_normalized_bias_floors_the_normaliser_at_10():
    q = torch.tensor([1.0, 0.0, 250.0, -90.0])
    g = torch.tensor([0.5, -4.0, 200.0, -100.0])
    got = B.normalized_bias(q, g)
    torch.testing.assert_close(got, torch.tensor([0.05, 0.4, 0.25, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="differ"):
        B.normalized_bias(q, g[:3])


def test_bias_of_a_saved_run_is_measured_on_whole_sampled_episodes(sota_run, monkeypatch):
    """The returns come from whole episodes (Pendulum: 200 steps, its time limit), the
    first ``cutoff`` pairs of each count, and the figures agree with one another."""
    seen = []
    real = B.soft_discounted_returns

    def spy(rewards, log_probs, gamma, alpha=0.0):
        out = real(rewards, log_probs, gamma, alpha)
        seen.append((rewards.reshape(-1).clone(), log_probs.reshape(-1).clone(), out, alpha))
        return out

    monkeypatch.setattr(B, "soft_discounted_returns", spy)
    est = B.q_estimation_bias(sota_run, states=250, cutoff=120, seed=1)
    assert [len(r) for r, *_ in seen] == [200, 200, 200]  # 3 x 120 >= 250 pairs
    assert est.episodes == 3 and est.states == 250 and est.num_members == 6
    assert all(torch.isfinite(lp).all() and lp.std() > 0 for _, lp, *_ in seen)  # sampled
    assert seen[0][3] == est.alpha > 0 and math.isclose(est.gamma, 0.99, rel_tol=1e-6)
    kept = torch.cat([g[:120] for *_, g, _ in seen])[:250]
    assert est.mean_return == pytest.approx(float(kept.mean()))
    assert est.bias == pytest.approx(est.mean_q - est.mean_return)
    assert est.min_norm_bias <= est.norm_bias  # the minimum is below the mean
    assert all(r.max() <= 0 for r, *_ in seen)  # Pendulum's rewards: the env's, not others
    again = B.q_estimation_bias(sota_run, states=250, cutoff=120, seed=1)
    other = B.q_estimation_bias(sota_run, states=250, cutoff=120, seed=2)
    assert again.norm_bias == est.norm_bias and other.norm_bias != est.norm_bias


def test_cli_bias_writes_the_table_and_the_csv(sota_run, tmp_path):
    from torchrl_spqr.analysis import cli

    out = tmp_path / "out"
    cli.main([str(sota_run), "--bias", "--bias-states", "100", "--out", str(out)])
    text = (out / "bias.md").read_text()
    assert "REDQ's test" in text and "| beta1.0_N6 | 1 |" in text
    with (out / "bias.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert tuple(row) == B.CSV_FIELDS and int(row["states"]) == 100
    assert float(row["bias"]) == pytest.approx(float(row["mean_q"]) - float(row["mean_return"]))
    with pytest.raises(SystemExit):
        cli.main([str(sota_run), "--bias", "--until", "40"])
