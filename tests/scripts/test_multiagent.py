"""Multi-agent SPQR: the regulariser per agent on [N, batch, agents] Q-values, the
multi-agent critic member, and the MASAC script (end to end, resume, config errors).

Axes: TorchRL's vmapped critic calls give Q-values ``[N, B, n_agents, 1]``; dim 0 is the
ensemble, the agent dim is a batch dim. SPQR must build one matrix per (sample, agent).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import load_script
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded, Composite
from torchrl.modules import ProbabilisticActor, TanhNormal
from torchrl.modules.models.multiagent import MultiAgentMLP
from torchrl.objectives import SACLoss, ValueEstimators

from torchrl_spqr import SPQRLoss
from torchrl_spqr.functional import spqr_kl
from torchrl_spqr.modules import MultiAgentQNet, QEnsemble
from torchrl_spqr.objectives import EnsembleSACLoss
from torchrl_spqr.training import multiagent as MA
from torchrl_spqr.training.builders import ConfigError
from torchrl_spqr.training.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "sota_scripts/masac_spqr"
A, OBS, ACT, N, B, H = 3, 5, 2, 6, 16, 16
G = "agents"


# ------------------------------------------------------------------ builders
def make_actor() -> ProbabilisticActor:
    net = nn.Sequential(
        MultiAgentMLP(
            n_agent_inputs=OBS,
            n_agent_outputs=2 * ACT,
            n_agents=A,
            centralised=False,
            share_params=True,
            depth=1,
            num_cells=H,
        ),
        NormalParamExtractor(),
    )
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=[(G, "observation")], out_keys=[(G, "loc"), (G, "scale")]),
        spec=_action_spec(),
        in_keys=[(G, "loc"), (G, "scale")],
        out_keys=[(G, "action")],
        distribution_class=TanhNormal,
        return_log_prob=True,
    )


def _action_spec() -> Composite:
    return Composite({G: Composite({"action": Bounded(-1.0, 1.0, (A, ACT))}, shape=(A,))})


def make_critics(centralised: bool, share: bool, n: int = N) -> QEnsemble:
    def member():
        return TensorDictModule(
            MultiAgentQNet(
                A, OBS + ACT, num_cells=(H, H), centralised=centralised, share_params=share
            ),
            in_keys=[(G, "observation"), (G, "action")],
            out_keys=[(G, "state_action_value")],
        )

    return QEnsemble(member, n)


def make_sac(critics: QEnsemble, seed: int = 0) -> SACLoss:
    torch.manual_seed(seed)
    sac = EnsembleSACLoss(
        make_actor(),
        critics.members(),
        num_qvalue_nets=critics.num_members,
        delay_qvalue=True,
        action_spec=_action_spec(),
    )
    sac.set_keys(
        state_action_value=(G, "state_action_value"),
        action=(G, "action"),
        reward=(G, "reward"),
        done=(G, "done"),
        terminated=(G, "terminated"),
    )
    sac.make_value_estimator(ValueEstimators.TD0, gamma=0.9)
    return sac


def make_batch(b: int = B, seed: int = 0) -> TensorDict:
    """A multi-agent batch as the MASAC script stores it (done flags expanded to agents)."""
    g = torch.Generator().manual_seed(seed)
    zeros = torch.zeros(b, A, 1, dtype=torch.bool)
    return TensorDict(
        {
            G: TensorDict(
                {
                    "observation": torch.randn(b, A, OBS, generator=g),
                    "action": torch.rand(b, A, ACT, generator=g) * 2 - 1,
                },
                [b, A],
            ),
            "next": TensorDict(
                {
                    G: TensorDict(
                        {
                            "observation": torch.randn(b, A, OBS, generator=g),
                            "reward": torch.randn(b, A, 1, generator=g),
                            "done": zeros.clone(),
                            "terminated": zeros.clone(),
                        },
                        [b, A],
                    ),
                    "done": torch.zeros(b, 1, dtype=torch.bool),
                    "terminated": torch.zeros(b, 1, dtype=torch.bool),
                },
                [b],
            ),
        },
        [b],
    )


def tied(sac: SACLoss, centralised: bool, share: bool) -> QEnsemble:
    return make_critics(centralised, share, sac.num_qvalue_nets).tie_to_loss(sac)


def q_at(ens: QEnsemble, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """[N, B, A] Q-values of the ensemble."""
    td = TensorDict(
        {G: TensorDict({"observation": obs, "action": act}, obs.shape[:2])}, obs.shape[:1]
    )
    with torch.no_grad():
        q = ens(td).get((G, "state_action_value"))
    assert q.shape == (ens.num_members, obs.shape[0], A, 1)
    return q.squeeze(-1)


# ------------------------------------------------------------------ SPQRLoss per agent
CRITICS = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("centralised,share", CRITICS)
def test_data_pairs_per_agent_equal_functional(centralised, share):
    """pairs='data', reduction='none': entry [b, a] is spqr_kl of agent a's N values at b."""
    sac = make_sac(make_critics(centralised, share))
    batch = make_batch()
    out = SPQRLoss(sac, beta=1.0, pairs="data", reduction="none")(batch)
    assert out["loss_spqr"].shape == (B, A)
    q = q_at(tied(sac, centralised, share), batch[G, "observation"], batch[G, "action"])
    per_agent = torch.stack([spqr_kl(q[:, :, a], reduction="none") for a in range(A)], -1)
    torch.testing.assert_close(out["loss_spqr"].detach(), per_agent, rtol=1e-5, atol=1e-6)
    mean = SPQRLoss(sac, beta=1.0, pairs="data")(batch)
    agent_means = torch.stack([spqr_kl(q[:, :, a]) for a in range(A)])
    torch.testing.assert_close(mean["spqr_kl"], agent_means.mean(), rtol=1e-5, atol=1e-6)
    if not (centralised and share):
        # agents have different critics' values: a computation that mixed agents into
        # the ensemble axis (or ignored one) would not match the per-agent values above
        assert not torch.allclose(agent_means[0], agent_means[1])
        mixed = spqr_kl(q.permute(0, 2, 1).reshape(N * A, B)[: N + 4])
        assert not torch.allclose(mean["spqr_kl"], mixed)
    else:
        # one joint value read by every agent: identical per-agent matrices
        torch.testing.assert_close(per_agent[:, 0], per_agent[:, 2])


@pytest.mark.parametrize("centralised,share", [(True, True), (False, False)])
def test_next_policy_fused_per_agent(centralised, share):
    """Default pairs (authors'): online ensemble at (s', a'), a' the target's own sample,
    fused into the critic-loss call; KL = mean over agents of the per-agent KL."""
    sac = make_sac(make_critics(centralised, share))
    seen = {}
    fn = sac.__dict__["_vmap_qnetworkN0"]

    def spy(td, params, *args, **kwargs):
        if params is sac.target_qvalue_network_params:
            seen["next"] = td.detach().clone()
        return fn(td, params, *args, **kwargs)

    sac.__dict__["_vmap_qnetworkN0"] = spy
    loss = SPQRLoss(sac, beta=1.0)
    batch = make_batch()
    out = loss(batch)
    assert loss.last_source == "fused"
    nxt = seen["next"]
    torch.testing.assert_close(nxt[G, "observation"], batch["next", G, "observation"])
    q = q_at(tied(sac, centralised, share), nxt[G, "observation"], nxt[G, "action"])
    expected = torch.stack([spqr_kl(q[:, :, a]) for a in range(A)]).mean()
    torch.testing.assert_close(out["spqr_kl"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_spqr"], expected, rtol=1e-5, atol=1e-6)
    # gradient reaches every critic member, never the actor
    out["loss_spqr"].backward()
    for key, leaf in sac.qvalue_network_params.items(True, True):
        for i in range(N):
            assert leaf.grad[i].abs().sum() > 0, f"member {i} {key} got no gradient"
    for key, leaf in sac.actor_network_params.items(True, True):
        assert leaf.grad is None or not leaf.grad.any(), key


@pytest.mark.parametrize("pairs,reuse", [("policy", True), ("next_policy", False)])
def test_extra_pass_pairs_on_agent_shapes(pairs, reuse):
    """Pairs that need their own policy sample and ensemble pass also keep agents apart."""
    sac = make_sac(make_critics(False, False))
    loss = SPQRLoss(sac, beta=1.0, pairs=pairs, reuse=reuse, reduction="none")
    out = loss(make_batch())
    assert loss.last_source == "extra_pass"
    assert out["loss_spqr"].shape == (B, A) and torch.isfinite(out["loss_spqr"]).all()
    out["loss_spqr"].mean().backward()
    for key, leaf in sac.actor_network_params.items(True, True):
        assert leaf.grad is None or not leaf.grad.any(), key


def test_agent_slices_do_not_interact():
    """The KL of agent a depends on agent a's ensemble values only (gradient and value)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(N, B, A, generator=g, requires_grad=True)
    kl = spqr_kl(q, reduction="none")
    assert kl.shape == (B, A)
    kl[:, 0].sum().backward()
    assert q.grad[:, :, 0].abs().sum() > 0
    assert q.grad[:, :, 1:].abs().sum() == 0
    q2 = q.detach().clone()
    q2[:, :, 1:] = torch.randn(N, B, A - 1, generator=g) * 100
    torch.testing.assert_close(spqr_kl(q2, reduction="none")[:, 0], kl[:, 0].detach())


def test_beta_zero_is_the_bare_masac_loss():
    bare = make_sac(make_critics(True, False), seed=3)
    wrapped = SPQRLoss(make_sac(make_critics(True, False), seed=3), beta=0.0)
    # same seed, same weights? the critics come from different QEnsembles: copy them
    wrapped.loss_module.load_state_dict(bare.state_dict())
    torch.manual_seed(5)
    bo = bare(make_batch())
    torch.manual_seed(5)
    o = wrapped(make_batch())
    for key in bo.keys(True, True):
        assert torch.equal(o.get(key), bo.get(key)), key
    assert o["loss_spqr"] == 0 and torch.isfinite(o["spqr_kl"])


# ------------------------------------------------------------------ critic member
def test_multiagent_qnet_information_flow():
    torch.manual_seed(0)
    obs = torch.randn(4, A, OBS + ACT)
    obs2 = obs.clone()
    obs2[:, 1] += 1.0  # change agent 1's input only
    for centralised in (True, False):
        for share in (True, False):
            net = MultiAgentQNet(
                A, OBS + ACT, num_cells=(H,), centralised=centralised, share_params=share
            )
            y, y2 = net(obs), net(obs2)
            assert y.shape == (4, A, 1)
            changed = (y - y2).abs().amax((0, 2)) > 0
            if centralised:
                assert changed.all(), (centralised, share)
            else:
                assert changed.tolist() == [False, True, False], (centralised, share)
            if centralised and share:
                assert torch.equal(y[:, 0], y[:, 2])
            if not share:
                # per-agent networks are initialised independently
                w = net.net[0].weight
                assert not torch.allclose(w[0], w[1])
    with pytest.raises(ValueError, match="n_agents=3"):
        MultiAgentQNet(A, OBS, num_cells=(H,))(torch.randn(4, A + 1, OBS))


def test_ensemble_members_independent_and_one_call():
    ens = make_critics(True, False)
    for key, leaf in ens.params.items(True, True):
        for i in range(1, N):
            assert not torch.equal(leaf[0], leaf[i]), key  # biases included
    calls = {"n": 0}
    ens.module.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    batch = make_batch()
    q = q_at(ens, batch[G, "observation"], batch[G, "action"])
    assert calls["n"] == 1 and q.shape == (N, B, A)
    assert (q.std(0) > 0).all()


# ------------------------------------------------------------------ the script
needs_vmas = pytest.mark.skipif(
    importlib.util.find_spec("vmas") is None or importlib.util.find_spec("hydra") is None,
    reason="the MASAC script needs vmas and hydra-core (pip install 'torchrl-spqr[multiagent]')",
)

TINY = [
    "env.num_envs=4",
    "env.max_steps=10",
    "collector.frames_per_batch=40",
    "replay_buffer.size=400",
    "optim.batch_size=16",
    "optim.num_epochs=1",  # 40 // 16 = 2 updates per iteration
    "network.hidden_sizes=[16,16]",
    "network.ensemble_size=3",
    "logger.eval_interval=80",
    "logger.eval_episodes=2",
    "logger.progress=false",
    "checkpoint.interval=80",
]


def _cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(SCRIPT), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@needs_vmas
def test_script_end_to_end_subprocess(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(SCRIPT / "masac_spqr.py"),
        *TINY,
        "collector.total_frames=240",
        "network.centralised_critic=false",  # ISAC, per-agent critics
        "network.shared_parameters=false",
        f"hydra.run.dir={run_dir}",
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "RL_WARNINGS": "0"}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "best eval return" in res.stdout
    for name in ("metrics.csv", "learning_curve.png", "checkpoint/state.pt"):
        assert (run_dir / name).exists(), name
    rows = _rows(run_dir)
    assert [int(r["frames"]) for r in rows] == [40, 80, 120, 160, 200, 240]
    assert [int(r["updates"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    assert [r["eval_return"] != "" for r in rows] == [False, True, False, True, False, True]
    kl = [float(r["spqr_kl"]) for r in rows]
    assert all(0.5 < v < 3.0 for v in kl)  # N=3: 2x2 matrices
    assert all(0.0 <= float(r["spqr_accept_rate"]) <= 1.0 for r in rows)
    assert int(rows[-1]["episodes"]) == 240 // 10  # every env copy ends an episode each 10 steps
    assert (run_dir / "logs/csv/scalars/spqr_kl.csv").exists()


@needs_vmas
def test_interrupt_and_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    S = load_script("masac_spqr")
    calls = {"n": 0}
    real = S.update

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # Ctrl-C during the 3rd iteration's updates
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        S.train(_cfg("collector.total_frames=200"), run)
    monkeypatch.setattr(S, "update", real)
    ck = load_checkpoint(run)  # weights_only=True
    assert ck["counters"]["frames"] == 120 and ck["counters"]["updates"] == 5
    assert [int(r["frames"]) for r in _rows(run)] == [40, 80]
    loss_before = ck["loss"]
    res = S.train(_cfg("collector.total_frames=200", "resume=true"), run)
    assert res["frames"] == 200
    rows = _rows(run)
    # the interrupted iteration's frames are counted; its row (owed at the stop, with the
    # metrics of its last update) is written first on resume: every row once, none lost
    assert [int(r["frames"]) for r in rows] == [40, 80, 120, 160, 200]
    assert [int(r["updates"]) for r in rows] == [2, 4, 5, 7, 9]
    assert rows[2]["eval_return"] == "" and rows[2]["loss_qvalue"] != ""
    assert int(rows[-1]["updates"]) == 5 + 2 * 2
    # resumed from the checkpoint's weights, then trained further
    after = load_checkpoint(run)["loss"]
    changed = [k for k in loss_before if not torch.equal(loss_before[k], after[k])]
    assert any("qvalue_network_params" in k for k in changed)


@needs_vmas
def test_checkpoint_restores_weights(tmp_path):
    run = tmp_path / "run"
    load_script("masac_spqr").train(_cfg("collector.total_frames=80"), run)
    ck = load_checkpoint(run)
    cfg = _cfg("collector.total_frames=80")
    env = MA.make_environment(cfg, 0)
    loss, _ = MA.make_loss_module(cfg, MA.make_actor(cfg, env), MA.make_critics(cfg, env), env)
    fresh = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.load_state_dict(ck["loss"])
    for k, v in ck["loss"].items():
        assert torch.equal(loss.state_dict()[k], v), k
    assert any(not torch.equal(fresh[k], ck["loss"][k]) for k in fresh)
    buf = MA.make_replay_buffer(cfg)
    load_checkpoint(run, buf)
    assert len(buf) == 80 and buf[:2][G, "observation"].shape == (2, 3, 16)


@needs_vmas
@pytest.mark.parametrize(
    "override,field",
    [
        ("env.scenario_name=no_such_scenario", "env.scenario_name"),
        ("spqr.beta=-1", "spqr.beta"),
        ("network.ensemble_size=2", "network.ensemble_size"),
        ("optim.batch_size=1000", "optim.batch_size"),
        ("collector.total_frames=10", "collector.total_frames"),
        ("collector.frames_per_batch=42", "collector.frames_per_batch"),
        ("env.continuous_actions=false", "env.continuous_actions"),
        ("network.activation=sigmoid", "network.activation"),
        ("optim.gamma=1.5", "optim.gamma"),
        ("algorithm=sac_ens", "algorithm"),
    ],
)
def test_bad_config_names_field(override, field, tmp_path):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_script("masac_spqr").train(_cfg(override), tmp_path / "bad")
    assert not (tmp_path / "bad" / "metrics.csv").exists()


@needs_vmas
@pytest.mark.parametrize("stop", [None, RuntimeError])
def test_collector_shut_down_on_every_exit_path(stop, tmp_path, monkeypatch):
    """The script shuts its collector down once, on a normal end and on an exception."""
    S = load_script("masac_spqr")
    made = []

    def spied_collector(*args, **kwargs):
        collector = MA.make_collector(*args, **kwargs)
        real_shutdown = collector.shutdown
        calls = []

        def shutdown(*a, **kw):
            calls.append(1)
            return real_shutdown(*a, **kw)

        collector.shutdown = shutdown
        made.append(calls)
        return collector

    def failing_update(*args, **kwargs):
        raise stop("update failed")

    monkeypatch.setattr(S, "make_collector", spied_collector)
    if stop is None:
        res = S.train(_cfg("collector.total_frames=80"), tmp_path / "run")
        assert res["frames"] == 80
    else:
        monkeypatch.setattr(S, "update", failing_update)
        with pytest.raises(stop, match="update failed"):
            S.train(_cfg("collector.total_frames=80"), tmp_path / "run")
    assert [len(calls) for calls in made] == [1]
    assert load_checkpoint(tmp_path / "run")["counters"]["frames"] == 40 * (
        2 if stop is None else 1
    )


def test_old_train_masac_names_the_script():
    """The loop left the package: the old name says where it is now, and warns nothing."""
    import warnings

    import torchrl_spqr.multiagent as old

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match=r"train\(cfg, run_dir\).*masac_spqr\.py"):
            old.train_masac  # noqa: B018


def test_activation_choices_match_the_config_check():
    """Every activation the config check accepts is one the builders can build, and back."""
    from torchrl_spqr.training import validation

    assert sorted(MA.ACTIVATIONS) == sorted(validation.ACTIVATIONS)
