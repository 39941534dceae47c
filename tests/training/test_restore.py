"""torchrl_spqr.training.restore.load_agent: one way to rebuild a run's agent, read safely."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_spqr.modules import QEnsemble, make_q_member
from torchrl_spqr.objectives.spqr import SPQRLoss
from torchrl_spqr.training import builders as B
from torchrl_spqr.training.checkpoint import save_checkpoint
from torchrl_spqr.training.restore import load_agent, load_policy_from_run

ROOT = Path(__file__).resolve().parents[2]

CFG = {
    "algorithm": "sac_ens",
    "seed": 3,
    "env": {"name": "Pendulum-v1", "max_episode_steps": 20},
    "network": {"ensemble_size": 3, "hidden_sizes": [8, 8]},
    "optim": {"gamma": 0.99, "alpha_init": 1.0},
    "spqr": {"beta": 2.0, "pairs": "data"},
}


def _obs(n: int = 6) -> TensorDict:
    return TensorDict(
        {"observation": torch.randn(n, 3, generator=torch.Generator().manual_seed(1))}, [n]
    )


def _deterministic(actor, td: TensorDict) -> torch.Tensor:
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        return actor(td.clone())["action"]


def _sota_run(run_dir: Path, *, buffer: bool = False):
    """A checkpoint as the sota_scripts write it: config, loss state, counters (and buffer)."""
    torch.manual_seed(0)
    env = B.make_environment(CFG, seed=0)
    actor = B.make_actor(CFG, env)
    loss, base = B.make_loss_module(CFG, actor, B.make_critics(CFG, env), env.action_spec)
    with torch.no_grad():  # "trained" weights, distinct from a fresh build
        for p in loss.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rb = None
    if buffer:
        rb = TensorDictReplayBuffer(storage=LazyTensorStorage(50), batch_size=4)
        rb.extend(env.rollout(12).reshape(-1))
    env.close()
    state = {"loss": loss.state_dict(), "config": CFG, "counters": {"frames": 12, "updates": 7}}
    save_checkpoint(run_dir, state, rb)
    return loss, base


def test_sota_run_is_rebuilt_from_its_config(tmp_path):
    run = tmp_path / "a_name_load_agent_does_not_read"
    loss, base = _sota_run(run, buffer=True)
    with load_agent(run, buffer=True) as agent:
        assert agent.script == "sota_scripts" and agent.algorithm == "sac_ens"
        assert agent.config == CFG and agent.env_id == "Pendulum-v1"
        assert agent.counters == {"frames": 12, "updates": 7} and agent.run_dir == run
        assert isinstance(agent.loss, SPQRLoss) and agent.beta == 2.0
        assert agent.spqr == {"pairs": "data", "filling": "ordered", "density": "paper"}
        assert agent.buffer is not None and agent.buffer.shape[0] == 12
        torch.testing.assert_close(agent.loss.state_dict(), loss.state_dict())
        with base.actor_network_params.to_module(base.actor_network):
            ref = _deterministic(base.actor_network, _obs())
        torch.testing.assert_close(_deterministic(agent.actor, _obs()), ref)  # trained weights
        env = agent.env
    assert env.is_closed  # the context manager closes the environment
    assert load_agent(run).buffer is None  # the buffer is read only when asked for


def test_load_policy_from_run_is_the_restored_actor(tmp_path):
    _sota_run(tmp_path / "run")
    policy = load_policy_from_run(tmp_path / "run")
    agent = load_agent(tmp_path / "run")
    agent.close()
    obs = _obs()
    ref = _deterministic(agent.actor, obs).numpy()
    torch.testing.assert_close(
        torch.as_tensor(policy(obs["observation"].numpy())), torch.as_tensor(ref)
    )
    assert policy.env_id == "Pendulum-v1" and policy.run_dir == str(tmp_path / "run")


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"examples/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_run_is_rebuilt_from_its_saved_arguments_not_its_name(tmp_path):
    ex = _load_example("redq_spqr")
    from torchrl_spqr.objectives import ReferenceREDQLoss

    env = ex.make_env("Pendulum-v1", 0)
    actor = ex.make_actor(env, 8)
    critics = QEnsemble(lambda: make_q_member(4, num_cells=(8, 8)), 4)
    base = ReferenceREDQLoss(
        actor, critics, sub_sample_len=3, policy_update_delay=5, target_entropy=-0.5
    )
    loss = SPQRLoss(base, beta=0.5)
    env.close()
    args = {
        "env": "Pendulum-v1",
        "seed": 1,
        "ensemble": 4,
        "subset": 3,
        "utd": 5,
        "beta": 0.5,
        "hidden": 8,
    }
    run = tmp_path / "renamed"  # a folder name the examples never write
    run.mkdir()
    state = {"actor": actor.state_dict(), "loss": loss.state_dict(), "args": args, "frames": 9}
    torch.save(state, run / "checkpoint.pt")
    with load_agent(run) as agent:
        assert agent.script == "examples/redq_spqr.py" and agent.config["args"] == args
        assert (
            agent.base.sub_sample_len == 3 and agent.beta == 0.5 and agent.counters == {"frames": 9}
        )
        td = TensorDict({"observation": torch.randn(5, 3), "action": torch.rand(5, 1)}, [5])
        ref = critics.q_values(td)
        net, params = agent.base.qvalue_network, agent.base.qvalue_network_params
        got = []
        for i in range(4):
            with params[i].to_module(net):
                got.append(net(td.clone()).get(net.out_keys[0]).reshape(-1))
        torch.testing.assert_close(torch.stack(got), ref.reshape(4, -1))  # the saved critics


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint/state.pt"):
        load_agent(tmp_path)
    masac = tmp_path / "masac"
    save_checkpoint(masac, {"loss": {}, "config": {"algorithm": "masac", "env": {"name": None}}})
    with pytest.raises(ValueError, match="multi-agent"):
        load_agent(masac)
    empty = tmp_path / "noconfig"
    save_checkpoint(empty, {"loss": {}})
    with pytest.raises(ValueError, match="holds no 'config'"):
        load_agent(empty)
    no_env = tmp_path / "noenv"
    save_checkpoint(no_env, {"loss": {}, "config": {"algorithm": "sac_n", "env": {}}})
    with pytest.raises(ValueError, match="neither env.name nor dataset.id"):
        load_agent(no_env)


def _population_folder(root: Path, agent_frames: int, pop_frames: int):
    """``root/checkpoint`` as a population writes it (agents ``b`` and ``a``, buffer
    ``[n, 2]``) and agent ``a``'s own checkpoint, at ``agent_frames``, in ``root/a``."""
    _sota_run(root / "a")
    state = torch.load(root / "a" / "checkpoint" / "state.pt", weights_only=True)
    state["counters"] = {"frames": agent_frames, "updates": 7}
    save_checkpoint(root / "a", state)
    data = TensorDict({"observation": torch.arange(12.0).reshape(6, 2, 1).expand(6, 2, 3)}, [6, 2])
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(10), batch_size=2)
    rb.extend(data)
    agents = {"b": {"counters": {"frames": pop_frames}}, "a": {"counters": {"frames": pop_frames}}}
    save_checkpoint(root, {"population": {}, "agents": agents, "config": {}}, rb)
    return data


def test_population_agent_reads_its_slice_of_the_population_buffer(tmp_path):
    data = _population_folder(tmp_path / "pop", agent_frames=12, pop_frames=12)
    with load_agent(tmp_path / "pop" / "a", buffer=True) as agent:
        # agent "a" is the second listed: column 1 of the [n, K] buffer
        torch.testing.assert_close(agent.buffer["observation"], data["observation"][:, 1])
    assert load_agent(tmp_path / "pop" / "a").buffer is None  # only when asked for
    # a population checkpoint at another step than the agent's: not used, and said so
    _population_folder(tmp_path / "late", agent_frames=12, pop_frames=20)
    with pytest.warns(UserWarning, match="at frame 20, the agent's at 12: its replay buffer"):
        agent = load_agent(tmp_path / "late" / "a", buffer=True)
    assert agent.buffer is None
    agent.close()
