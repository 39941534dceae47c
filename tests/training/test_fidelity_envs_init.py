"""Issue 18, items 3-4: D4RL evaluation envs in the data's own dynamics; reference inits."""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from torchrl_spqr import data as D
from torchrl_spqr.modules import QEnsemble, init_linear_stack_, make_q_member
from torchrl_spqr.training import builders as B
from torchrl_spqr.training.config import resolve_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# gym's mujoco-py v2/v3 models (gym/envs/mujoco/assets/*.xml), the envs D4RL's -v2 data came
# from: geom name -> sliding friction.
V2_FRICTION = {
    "walker2d": {"foot_geom": 0.9, "foot_left_geom": 1.9, "floor": 0.7},
    "hopper": {"foot_geom": 2.0, "floor": 1.0},
    "halfcheetah": {"bfoot": 0.4, "ffoot": 0.4, "floor": 0.4},
}
V2_TIMING = {"walker2d": (0.002, 4), "hopper": (0.002, 4), "halfcheetah": (0.01, 5)}


def _friction(model, name: str) -> float:
    gid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, name)
    assert gid >= 0, name
    return float(model.geom_friction[gid][0])


@pytest.mark.parametrize("family", ["walker2d", "hopper", "halfcheetah"])
def test_d4rl_eval_env_has_the_datas_friction(family):
    ds_id = f"{family}-medium-v2"
    env = gym.make(D.d4rl_env_id(ds_id), **D.d4rl_env_kwargs(ds_id))
    model = env.unwrapped.model
    for geom, mu in V2_FRICTION[family].items():
        assert _friction(model, geom) == pytest.approx(mu), (family, geom)
    timestep, frame_skip = V2_TIMING[family]
    assert model.opt.timestep == pytest.approx(timestep)
    assert env.unwrapped.frame_skip == frame_skip
    env.close()


def test_walker2d_v5_differs_which_is_why_d4rl_uses_v4():
    env = gym.make("Walker2d-v5")
    assert _friction(env.unwrapped.model, "foot_geom") == pytest.approx(1.9)
    env.close()


@pytest.mark.parametrize("family", ["walker2d", "hopper"])
def test_d4rl_eval_env_pays_healthy_reward_on_the_terminal_step(family):
    """gym v2/v3 (D4RL's data and reference scores) pay healthy_reward when terminating."""
    ds_id = f"{family}-medium-v2"
    env = gym.make(D.d4rl_env_id(ds_id))
    env.reset(seed=0)
    u = env.unwrapped
    qpos, qvel = u.init_qpos.copy(), np.zeros_like(u.init_qvel)
    qpos[1] = 0.3  # torso far below the healthy height
    u.set_state(qpos, qvel)
    _, reward, terminated, _, info = env.step(np.zeros(env.action_space.shape))
    assert terminated
    assert reward - info["x_velocity"] == pytest.approx(1.0, abs=1e-6)
    env.close()


# --------------------------------------------------------------------------- inits
N_IN, HIDDEN = 14, (256, 256)


def _linears(member):
    return [m for m in member.modules() if isinstance(m, nn.Linear)]


def test_default_init_is_pytorchs():
    lin = _linears(make_q_member(N_IN, num_cells=HIDDEN))
    assert lin[0].weight.abs().max() <= 1 / math.sqrt(N_IN)
    assert lin[-1].weight.abs().max() > 3e-3  # not the EDAC output layer


def test_edac_init_statistics():
    lin = _linears(make_q_member(N_IN, num_cells=HIDDEN, init="edac"))
    for layer in lin[:-1]:
        assert torch.all(layer.bias == 0.1)
        bound = 1 / math.sqrt(layer.in_features)
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound  # uniform over the whole range
    out = lin[-1]
    for p in (out.weight, out.bias):
        assert p.abs().max() <= 3e-3
    assert out.weight.abs().max() > 2.5e-3


def test_redq_init_statistics():
    lin = _linears(make_q_member(N_IN, num_cells=HIDDEN, init="redq"))
    for layer in lin:
        assert torch.all(layer.bias == 0)
        bound = math.sqrt(6.0 / (layer.in_features + layer.out_features))
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound
        # Xavier-uniform variance: bound^2 / 3
        assert layer.weight.var().item() == pytest.approx(bound**2 / 3, rel=0.15)


@pytest.mark.parametrize("init", ["default", "edac", "redq"])
def test_members_still_differ(init):
    ens = QEnsemble(lambda: make_q_member(N_IN, num_cells=(32, 32), init=init), 5)
    x = {"observation": torch.randn(64, 11), "action": torch.randn(64, 3)}
    from tensordict import TensorDict

    q = ens(TensorDict(x, [64]))["state_action_value"]
    assert q.shape[0] == 5
    assert q.std(0).min() > 0
    for i in range(5):
        for j in range(i):
            assert not torch.equal(q[i], q[j])


def test_bad_init_name_is_clear():
    with pytest.raises(ValueError, match="init='xavier'"):
        make_q_member(N_IN, init="xavier")
    with pytest.raises(ValueError, match="in_features"):
        make_q_member(None, init="edac")
    with pytest.raises(ValueError):
        init_linear_stack_([nn.Linear(2, 2)], "nope")


# --------------------------------------------------------------------------- actor
def _env_stub(n_obs=11, n_act=3):
    from torchrl.data import Bounded, Composite

    class Env:
        observation_spec = Composite(observation=Bounded(-1e9, 1e9, (n_obs,)))
        action_spec = Bounded(-1.0, 1.0, (n_act,))

    return Env()


def _cfg(**network):
    # the generic defaults (no reference init, no clamp), not sac_ens's own
    base = {"hidden_sizes": [32, 32], "init": "default", "actor_init": None}
    base["actor_log_std_clamp"] = None
    base.update(network)
    return OmegaConf.create({"algorithm": "sac_ens", "network": base})


def test_actor_log_std_clamp():
    actor = B.make_actor(_cfg(actor_log_std_clamp=[-20, 2]), _env_stub())
    head = actor.module[0].module[1]
    assert isinstance(head, B.ClampedLogStd)
    x = torch.cat([torch.zeros(4, 3), torch.tensor([[-100.0, 0.0, 100.0]]).expand(4, 3)], -1)
    loc, scale = head(x)
    assert torch.allclose(scale[0], torch.tensor([math.exp(-20), 1.0, math.exp(2)]))
    # the whole actor runs and its scale stays inside the bounds
    from tensordict import TensorDict

    td = actor(TensorDict({"observation": 1e3 * torch.randn(16, 11)}, [16]))
    assert (td["scale"] >= math.exp(-20) * 0.999).all() and (
        td["scale"] <= math.exp(2) * 1.001
    ).all()
    # default keeps TorchRL's softplus head
    actor = B.make_actor(_cfg(), _env_stub())
    assert not isinstance(actor.module[0].module[1], B.ClampedLogStd)


def test_actor_init_follows_the_reference():
    actor = B.make_actor(_cfg(init="edac"), _env_stub())
    lin = _linears(actor)
    assert all(torch.all(layer.bias == 0.1) for layer in lin[:-1])
    assert lin[-1].weight.abs().max() <= 1e-3 and lin[-1].bias.abs().max() <= 1e-3
    actor = B.make_actor(_cfg(init="edac", actor_init="redq"), _env_stub())
    assert all(torch.all(layer.bias == 0) for layer in _linears(actor))


def test_validate_network_init_fields():
    def check(**network):  # through the public config path (schema, then range checks)
        cfg = {"algorithm": "sac_ens", "env": {"name": "Hopper-v5"}, "network": network}
        resolve_config(cfg, "sac_ens")

    check(init="edac", actor_log_std_clamp=[-5, 2])
    with pytest.raises(B.ConfigError, match="network.init"):
        check(init="corl2")
    for bad in ([2, -5], [-5], "x", [float("nan"), 2], [True, 2]):
        with pytest.raises(B.ConfigError, match="actor_log_std_clamp"):
            check(actor_log_std_clamp=bad)


@pytest.mark.parametrize(
    "algo,init,clamp",
    [
        ("sac_n", "edac", [-5, 2]),
        ("edac", "edac", [-5, 2]),
        ("redq", "redq", [-20, 2]),
        ("sac_ens", "redq", [-20, 2]),
        ("cql", "edac", [-5, 2]),  # the SPQR authors' rlkit networks
    ],
)
def test_script_defaults(algo, init, clamp):
    cfg = OmegaConf.load(Path(__file__).parents[2] / f"sota_scripts/{algo}_spqr/config.yaml")
    assert cfg.network.init == init and cfg.network.actor_init == init
    assert list(cfg.network.actor_log_std_clamp) == clamp
