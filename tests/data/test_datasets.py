"""Offline data: local D4RL-style Minari datasets, loading through TorchRL, scores, errors."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict

minari = pytest.importorskip("minari")
pytest.importorskip("h5py")
import gymnasium as gym  # noqa: E402
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer  # noqa: E402

from torchrl_spqr import data as D  # noqa: E402
from torchrl_spqr.data import builder as data_builder  # noqa: E402
from torchrl_spqr.data.cli import main as cli_main  # noqa: E402
from torchrl_spqr.data.episodes import _RANDOM_REF_SEED  # noqa: E402
from torchrl_spqr.data.offline import _storage_td  # noqa: E402
from torchrl_spqr.data.store import _STAGING_DIR, _exists_locally, _local_h5  # noqa: E402
from torchrl_spqr.training.checkpoint import save_checkpoint  # noqa: E402
from torchrl_spqr.training.restore import (  # noqa: E402
    RunFolders,
    load_policy_from_run,
    run_episodes,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

TINY_ID = "local/hopper/tiny-random-v0"
TINY_STEPS = 600
TIME_LIMIT = 20  # short time limit: the tiny dataset has both terminations and truncations
OBS, ACT = 11, 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A private Minari store (nothing touches ~/.minari) holding the tiny random dataset."""
    root = tmp_path_factory.mktemp("offline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root / "minari"))
        ds = D.build_dataset(
            TINY_ID,
            "Hopper-v5",
            "random",
            steps=TINY_STEPS,
            seed=0,
            max_episode_steps=TIME_LIMIT,
            ref_max_score=3234.3,
        )
        yield {"root": root, "dataset": ds}


@pytest.fixture(autouse=True)
def _env(store, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store["root"] / "minari"))

    def offline(*args, **kwargs):  # every test runs without the hub
        raise ConnectionError("Minari hub unreachable (test)")

    monkeypatch.setattr(minari, "download_dataset", offline)


def _episodes(dataset_id):
    return list(minari.load_dataset(dataset_id).iterate_episodes())


# --------------------------------------------------------------------------- build + load
def test_tiny_random_dataset_matches_the_env(store):
    meta = store["dataset"].storage.metadata
    assert meta["total_steps"] == TINY_STEPS
    eps = _episodes(TINY_ID)
    assert sum(len(e.rewards) for e in eps) == TINY_STEPS
    # replay every episode in a fresh env (first reset seeded, as when collected)
    env = gym.make("Hopper-v5", max_episode_steps=TIME_LIMIT)
    n_trunc = n_term = 0
    for i, ep in enumerate(eps):
        assert ep.observations.dtype == np.float32 and ep.rewards.dtype == np.float32
        obs, _ = env.reset(seed=0 if i == 0 else None)
        np.testing.assert_allclose(ep.observations[0], obs, rtol=1e-6, atol=1e-6)
        for t, a in enumerate(ep.actions):
            obs, r, term, trunc, _ = env.step(a)
            np.testing.assert_allclose(ep.observations[t + 1], obs, rtol=1e-5, atol=1e-5)
            assert ep.rewards[t] == pytest.approx(r, rel=1e-5, abs=1e-5)
            last = t == len(ep.actions) - 1
            assert bool(ep.terminations[t]) == bool(term)
            if not last:
                assert not ep.truncations[t]
        assert not (ep.terminations[-1] and ep.truncations[-1])
        if i < len(eps) - 1:  # time-limit truncation: only at the limit, never terminal
            assert bool(ep.truncations[-1]) == (bool(trunc) and not term)
            assert ep.terminations[-1] or len(ep.actions) == TIME_LIMIT
        else:  # the trailing episode cut off by `steps` ends truncated
            assert ep.terminations[-1] or ep.truncations[-1]
        n_trunc += int(ep.truncations[-1])
        n_term += int(ep.terminations[-1])
    assert n_trunc >= 2 and n_term >= 2  # both kinds of episode ends are exercised


def test_load_local_minari_through_torchrl(store, monkeypatch):
    calls = []
    monkeypatch.setattr(minari, "download_dataset", lambda *a, **k: calls.append(a))
    data = D.load_offline_dataset(TINY_ID, batch_size=32, root=str(store["root"] / "trl"))
    assert not calls  # local data: the hub is never asked
    assert isinstance(data, D.OfflineData)
    assert data.env_id == "Hopper-v5"
    assert data.env_kwargs == {"max_episode_steps": TIME_LIMIT}
    assert data.num_transitions == TINY_STEPS == len(data.buffer)
    assert data.dataset_id == TINY_ID and data.source == "minari"

    batch = data.buffer.sample()
    assert batch.batch_size == torch.Size([32])
    assert batch["observation"].shape == (32, OBS) and batch["action"].shape == (32, ACT)
    assert batch["next", "observation"].shape == (32, OBS)
    for key in ("reward", "done", "terminated", "truncated"):
        assert batch["next", key].shape == (32, 1)
    for key in ("observation", "action", ("next", "observation"), ("next", "reward")):
        assert batch[key].dtype == torch.float32, key
    for key in ("done", "terminated", "truncated"):
        assert batch["next", key].dtype == torch.bool

    # the converted buffer holds the real data, episode after episode (TorchRL 0.14.1 alone
    # leaves it all zeros), with terminations and truncations apart
    eps = _episodes(TINY_ID)
    st = _storage_td(data.buffer)
    obs = np.concatenate([e.observations[:-1] for e in eps])
    nxt = np.concatenate([e.observations[1:] for e in eps])
    np.testing.assert_array_equal(st["observation"].numpy(), obs)
    np.testing.assert_array_equal(st["next", "observation"].numpy(), nxt)
    np.testing.assert_array_equal(
        st["next", "reward"].reshape(-1).numpy(), np.concatenate([e.rewards for e in eps])
    )
    term = st["next", "terminated"].reshape(-1).numpy()
    trunc = st["next", "truncated"].reshape(-1).numpy()
    np.testing.assert_array_equal(term, np.concatenate([e.terminations for e in eps]))
    np.testing.assert_array_equal(trunc, np.concatenate([e.truncations for e in eps]))
    assert not (term & trunc).any() and trunc.any() and term.any()
    np.testing.assert_array_equal(st["next", "done"].reshape(-1).numpy(), term | trunc)
    done = batch["next", "terminated"] | batch["next", "truncated"]
    assert (batch["next", "done"] == done).all()

    # reference scores from the dataset metadata
    meta = minari.load_dataset(TINY_ID).storage.metadata
    assert data.ref_min_score == pytest.approx(meta["ref_min_score"])
    assert data.ref_max_score == 3234.3


def test_converted_cache_is_reused_until_the_dataset_changes(tmp_path, monkeypatch):
    from torchrl.data.datasets import MinariExperienceReplay

    D.build_dataset("local/hopper/cache-v0", "Hopper-v5", "random", steps=50, ref_max_score=1e3)
    root = str(tmp_path / "trl")
    first = D.load_offline_dataset("local/hopper/cache-v0", batch_size=4, root=root)
    obs = _storage_td(first.buffer)["observation"].clone()

    def no_conversion(self):
        raise AssertionError("re-converted an unchanged dataset")

    with monkeypatch.context() as mp:  # a second load only maps the stamped cache
        mp.setattr(MinariExperienceReplay, "_download_and_preproc", no_conversion)
        again = D.load_offline_dataset("local/hopper/cache-v0", batch_size=4, root=root)
        assert torch.equal(_storage_td(again.buffer)["observation"], obs)
    D.build_dataset(  # same id, other data: the cache is rebuilt
        "local/hopper/cache-v0",
        "Hopper-v5",
        "random",
        steps=60,
        seed=5,
        ref_max_score=1e3,
        overwrite=True,
    )
    rebuilt = D.load_offline_dataset("local/hopper/cache-v0", batch_size=4, root=root)
    assert rebuilt.num_transitions == 60
    eps = _episodes("local/hopper/cache-v0")
    np.testing.assert_array_equal(
        _storage_td(rebuilt.buffer)["observation"].numpy(),
        np.concatenate([e.observations[:-1] for e in eps]),
    )


def test_ref_min_score_is_the_random_policy_return(store):
    meta = store["dataset"].storage.metadata
    env = gym.make("Hopper-v5", max_episode_steps=TIME_LIMIT)
    env.action_space.seed(_RANDOM_REF_SEED)
    returns = []
    for i in range(10):
        env.reset(seed=_RANDOM_REF_SEED + i)
        ret, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(env.action_space.sample())
            ret, done = ret + r, term or trunc
        returns.append(ret)
    assert meta["ref_min_score"] == pytest.approx(np.mean(returns))
    assert meta["ref_max_score"] == 3234.3
    assert "random" in meta["description"] and "Hopper-v5" in meta["description"]


def test_normalized_score_hand_computation(store):
    assert D.normalized_score(1000.0, -20.272305, 3234.3) == pytest.approx(
        100 * (1000 + 20.272305) / (3234.3 + 20.272305)
    )
    assert D.normalized_score(-20.272305, -20.272305, 3234.3) == pytest.approx(0.0)
    assert D.normalized_score(3234.3, -20.272305, 3234.3) == pytest.approx(100.0)
    meta = store["dataset"].storage.metadata
    lo, hi = meta["ref_min_score"], meta["ref_max_score"]
    data = D.OfflineData(None, "Hopper-v5", lo, hi, 0, TINY_ID)
    assert data.normalized_score(500.0) == pytest.approx(100 * (500 - lo) / (hi - lo))
    with pytest.raises(ValueError):
        D.normalized_score(1.0, 2.0, 2.0)
    with pytest.raises(ValueError):
        D.OfflineData(None, "Hopper-v5", None, None, 0, "x").normalized_score(1.0)


# --------------------------------------------------------------------------- replay kinds
def _synthetic_run(run_dir: Path, lengths_ends, capacity: int = 1000, seed: int = 0):
    """A run folder as the online script leaves it: checkpoint/state.pt + checkpoint/buffer.

    ``lengths_ends``: [(length, "terminated" | "truncated" | None)], None = still running.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for traj, (length, end) in enumerate(lengths_ends):
        obs = torch.randn(length + 1, OBS, generator=g)
        term = torch.zeros(length, 1, dtype=torch.bool)
        trunc = torch.zeros(length, 1, dtype=torch.bool)
        if end == "terminated":
            term[-1] = True
        elif end == "truncated":
            trunc[-1] = True
        rows.append(
            TensorDict(
                {
                    "observation": obs[:-1],
                    "action": torch.rand(length, ACT, generator=g) * 2 - 1,
                    "done": torch.zeros(length, 1, dtype=torch.bool),
                    "collector": {"traj_ids": torch.full((length,), traj)},
                    "next": {
                        "observation": obs[1:],
                        "reward": torch.randn(length, 1, generator=g),
                        "done": term | trunc,
                        "terminated": term,
                        "truncated": trunc,
                    },
                },
                batch_size=[length],
            )
        )
    data = torch.cat(rows)
    buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(capacity), batch_size=4)
    buffer.extend(data)
    cfg = {"algorithm": "sac_ens", "env": {"name": "Hopper-v5", "max_episode_steps": 7}}
    save_checkpoint(run_dir, {"loss": {}, "config": cfg}, buffer)
    return data


def test_medium_replay_from_a_run_folder(tmp_path):
    data = _synthetic_run(tmp_path / "run", [(5, "terminated"), (7, "truncated"), (4, None)])
    ds = D.build_dataset(
        "local/hopper/mr-v0",
        None,  # env from the run's config
        "medium-replay",
        source_run=str(tmp_path / "run"),
        ref_min_score=0.0,
        ref_max_score=100.0,
        runs=RunFolders(),
    )
    assert ds.storage.metadata["total_steps"] == 16
    eps = _episodes("local/hopper/mr-v0")
    assert [len(e.rewards) for e in eps] == [5, 7, 4]
    assert [bool(e.terminations[-1]) for e in eps] == [True, False, False]
    assert [bool(e.truncations[-1]) for e in eps] == [False, True, True]  # trailing one cut off
    for e in eps:
        assert not e.terminations[:-1].any() and not e.truncations[:-1].any()
    np.testing.assert_array_equal(eps[1].observations[:-1], data["observation"][5:12].numpy())
    np.testing.assert_array_equal(eps[1].observations[-1], data["next", "observation"][11].numpy())
    np.testing.assert_array_equal(eps[2].actions, data["action"][12:].numpy())
    meta = minari.load_dataset("local/hopper/mr-v0").storage.metadata
    assert (meta["ref_min_score"], meta["ref_max_score"]) == (0.0, 100.0)
    assert "medium-replay" in meta["description"]
    assert meta["env_spec"] and '"max_episode_steps": 7' in meta["env_spec"]


def test_replay_of_a_wrapped_ring_buffer(tmp_path):
    """Capacity 12, 16 transitions: the oldest 4 are overwritten; order starts at the cursor."""
    data = _synthetic_run(
        tmp_path / "run", [(5, "terminated"), (7, "truncated"), (4, None)], capacity=12
    )
    episodes = run_episodes(tmp_path / "run")
    assert [len(e) for e in episodes] == [1, 7, 4]
    assert episodes[0].terminations.tolist() == [True]
    np.testing.assert_array_equal(episodes[0].observations[0], data["observation"][4].numpy())
    assert [bool(e.truncations[-1]) for e in episodes] == [False, True, True]
    np.testing.assert_array_equal(episodes[2].rewards, data["next", "reward"][12:, 0].numpy())


def test_medium_expert_concatenates_two_local_datasets(store):
    a = D.build_dataset(
        "local/hopper/part-a-v0",
        "Hopper-v5",
        "random",
        steps=120,
        seed=1,
        ref_min_score=-5.0,
        ref_max_score=50.0,
    )
    b = D.build_dataset(
        "local/hopper/part-b-v0",
        "Hopper-v5",
        "random",
        steps=150,
        seed=2,
        ref_min_score=-7.0,
        ref_max_score=70.0,
    )
    me = D.build_dataset(
        "local/hopper/me-v0",
        None,
        "medium-expert",
        parts=["local/hopper/part-a-v0", "local/hopper/part-b-v0"],
    )
    ma, mb, mm = a.storage.metadata, b.storage.metadata, me.storage.metadata
    assert mm["total_steps"] == ma["total_steps"] + mb["total_steps"] == 270
    assert mm["total_episodes"] == ma["total_episodes"] + mb["total_episodes"]
    # ref_min_score of the medium part, ref_max_score of the expert part
    assert (mm["ref_min_score"], mm["ref_max_score"]) == (-5.0, 70.0)
    eps_me = _episodes("local/hopper/me-v0")
    eps_b = _episodes("local/hopper/part-b-v0")
    np.testing.assert_array_equal(eps_me[-1].observations, eps_b[-1].observations)
    data = D.load_offline_dataset("local/hopper/me-v0", batch_size=8, root=str(store["root"] / "t"))
    assert data.num_transitions == 270 and data.ref_max_score == 70.0
    with pytest.raises(FileExistsError):
        D.build_dataset("local/hopper/part-a-v0", "Hopper-v5", "random", steps=10)


# --------------------------------------------------------------------------- policies
def _tiny_run(run_dir: Path) -> tuple[dict, object, object]:
    from torchrl_spqr.training import builders as B

    torch.manual_seed(0)  # the "trained" weights below, and so the expert's score, are fixed
    cfg = {
        "algorithm": "sac_n",
        "env": {"name": "Hopper-v5", "max_episode_steps": 30},
        "network": {"ensemble_size": 3, "hidden_sizes": [16, 16]},
        "optim": {"gamma": 0.99, "alpha_init": 1.0},
        "spqr": {"beta": 1.0},
    }
    env = B.make_environment(cfg, seed=0)
    actor = B.make_actor(cfg, env)
    loss, base = B.make_loss_module(cfg, actor, B.make_critics(cfg, env), env.action_spec)
    with torch.no_grad():  # "trained" weights, distinct from a fresh build
        for p in base.actor_network_params.values(True, True):
            p.add_(0.3 * torch.randn_like(p))
    save_checkpoint(run_dir, {"loss": loss.state_dict(), "config": cfg})
    env.close()
    return cfg, base, loss


def test_load_policy_from_run_and_policy_datasets(tmp_path):
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    _, base, _ = _tiny_run(tmp_path / "run")
    policy = load_policy_from_run(tmp_path / "run")
    obs = np.random.default_rng(0).standard_normal((5, OBS))
    act = policy(obs)
    assert act.shape == (5, ACT) and act.dtype == np.float32
    assert np.all(np.abs(act) <= 1.0)
    np.testing.assert_allclose(policy(obs[0]), act[0], atol=1e-6)  # single obs too
    np.testing.assert_array_equal(policy(obs), act)  # deterministic
    with (
        torch.no_grad(),
        set_exploration_type(ExplorationType.DETERMINISTIC),
        base.actor_network_params.to_module(base.actor_network),
    ):
        ref = base.actor_network(TensorDict({"observation": torch.as_tensor(obs).float()}, [5]))
    np.testing.assert_allclose(act, ref["action"].numpy(), rtol=1e-5, atol=1e-6)

    med = D.build_dataset(
        "local/hopper/pol-medium-v0",
        "Hopper-v5",
        "medium",
        steps=60,
        policy=policy,
        noise=0.1,
        max_episode_steps=30,
        ref_min_score=0.0,
        ref_max_score=10.0,
    )
    assert med.storage.metadata["total_steps"] == 60
    expert_args = dict(
        steps=40,
        policy=str(tmp_path / "run"),
        max_episode_steps=30,
        ref_episodes=2,
        runs=RunFolders(),
    )
    # this untrained "expert" scores below the random policy: an inverted reference range
    # is refused (normalised scores would fall as the return rises), and nothing is written
    with pytest.raises(ValueError, match="is not above ref_min_score"):
        D.build_dataset("local/hopper/pol-expert-v0", "Hopper-v5", "expert", **expert_args)
    assert not _exists_locally("local/hopper/pol-expert-v0")
    exp = D.build_dataset(
        "local/hopper/pol-expert-v0",
        "Hopper-v5",
        "expert",
        **expert_args,
        ref_min_score=-100.0,
    )
    meta = exp.storage.metadata
    env = gym.make("Hopper-v5", max_episode_steps=30)
    expected = np.mean([_det_return(env, policy, _RANDOM_REF_SEED + i) for i in range(2)])
    assert meta["ref_max_score"] == pytest.approx(expected)  # mean return of the expert policy
    eps = _episodes("local/hopper/pol-expert-v0")
    obs0, _ = env.reset(seed=0)
    np.testing.assert_allclose(eps[0].actions[0], policy(obs0), atol=1e-6)  # no noise


def test_full_replay_from_an_expert_run(tmp_path):
    """The whole buffer of the expert run; ref_max_score = mean return of its actor."""
    _, _, loss = _tiny_run(tmp_path / "expert")
    data = _synthetic_run(tmp_path / "buf", [(6, "terminated"), (9, None)])
    buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(100), batch_size=4)
    buffer.extend(data)
    cfg = torch.load(tmp_path / "expert/checkpoint/state.pt", weights_only=True)["config"]
    save_checkpoint(tmp_path / "expert", {"loss": loss.state_dict(), "config": cfg}, buffer)
    ds = D.build_dataset(
        "local/hopper/full-replay-v0",
        None,
        "full-replay",
        expert_run=str(tmp_path / "expert"),
        ref_min_score=0.0,
        ref_episodes=2,
        runs=RunFolders(),
    )
    meta = ds.storage.metadata
    assert meta["total_steps"] == 15 and meta["total_episodes"] == 2
    policy = load_policy_from_run(tmp_path / "expert")
    env = gym.make("Hopper-v5", max_episode_steps=30)  # the run's time limit
    expected = np.mean([_det_return(env, policy, _RANDOM_REF_SEED + i) for i in range(2)])
    assert meta["ref_max_score"] == pytest.approx(expected)
    assert "full-replay" in meta["description"]


def _det_return(env, policy, seed):
    obs, _ = env.reset(seed=seed)
    ret, done = 0.0, False
    while not done:
        obs, r, term, trunc, _ = env.step(policy(obs))
        ret, done = ret + r, term or trunc
    return ret


# --------------------------------------------------------------------------- errors
def test_missing_minari_dataset_raises_a_clear_error(store, monkeypatch):
    seen = {}

    def unreachable(dataset_id, *args, **kwargs):
        import socket

        seen["timeout"] = socket.getdefaulttimeout()
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(minari, "download_dataset", unreachable)
    with pytest.raises(D.DatasetUnavailableError) as info:
        D.load_offline_dataset("mujoco/hopper/medium-v0", batch_size=4, root=str(store["root"]))
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "mujoco/hopper/medium-v0" in msg
    assert str(store["root"] / "minari") in msg  # the local path that was tried
    assert "ConnectionError" in msg and "huggingface.co" in msg  # the download and its error
    assert "python -m torchrl_spqr.data build --env Hopper-v5 --kind medium" in msg
    assert "minari download mujoco/hopper/medium-v0" in msg
    assert seen["timeout"] == D.DOWNLOAD_TIMEOUT_S  # the hub call cannot block for long

    with pytest.raises(D.DatasetUnavailableError, match="skipped"):
        D.load_offline_dataset("mujoco/hopper/medium-v0", batch_size=4, download=False)


def test_d4rl_id_mapping_and_reference_scores():
    assert D.parse_d4rl_id("hopper-medium-replay-v2") == ("hopper", "medium-replay", 2)
    assert D.d4rl_env_id("hopper-medium-replay-v2") == "Hopper-v4"
    assert D.d4rl_env_id("halfcheetah-expert-v2") == "HalfCheetah-v4"
    assert D.d4rl_env_id("walker2d-full-replay-v2") == "Walker2d-v4"
    assert D.d4rl_env_id("ant-medium-expert-v2") == "Ant-v4"
    assert D.d4rl_env_kwargs("ant-random-v2") == {"use_contact_forces": True}
    # D4RL's REF_MIN_SCORE / REF_MAX_SCORE (d4rl/infos.py), the same for every split
    assert D.d4rl_ref_scores("hopper-random-v0") == (-20.272305, 3234.3)
    assert D.d4rl_ref_scores("halfcheetah-medium-v2") == (-280.178953, 12135.0)
    assert D.d4rl_ref_scores("walker2d-medium-replay-v2") == (1.629008, 4592.3)
    assert D.d4rl_ref_scores("ant-expert-v2") == (-325.6, 3879.7)
    for bad in ("hopper-v2", "kitchen-mixed-v0", "Hopper-medium-v2", "hopper-medium"):
        with pytest.raises(ValueError):
            D.parse_d4rl_id(bad)
    # the eval envs take D4RL's observations (11 / 17 / 17 / 111 dims)
    for ds_id, dim in [
        ("hopper-medium-v2", 11),
        ("halfcheetah-medium-v2", 17),
        ("walker2d-medium-v2", 17),
        ("ant-medium-v2", 111),
    ]:
        env = gym.make(D.d4rl_env_id(ds_id), **D.d4rl_env_kwargs(ds_id))
        assert env.observation_space.shape == (dim,)
        env.close()


def test_d4rl_download_failure_is_clear(tmp_path, monkeypatch):
    import torchrl.data.datasets.d4rl as trl_d4rl

    def unreachable(url, path):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(trl_d4rl, "_download_dataset_from_url", unreachable)
    with pytest.raises(D.DatasetUnavailableError) as info:
        D.load_offline_dataset(
            "hopper-medium-replay-v2", batch_size=4, source="d4rl", root=str(tmp_path)
        )
    msg = str(info.value)
    assert "hopper-medium-replay-v2" in msg and "hopper_medium_replay-v2.hdf5" in msg
    assert "URLError" in msg and "name resolution" in msg
    assert "mujoco/hopper/medium-v0" in msg  # Minari's MuJoCo datasets
    assert "python -m torchrl_spqr.data build --env Hopper-v5 --kind medium-replay" in msg
    with pytest.raises(ValueError):
        D.load_offline_dataset("kitchen-mixed-v0", batch_size=4, source="d4rl")
    with pytest.raises(ValueError):
        D.load_offline_dataset(TINY_ID, batch_size=4, source="nope")


# --------------------------------------------------------------------------- CLI
def test_cli_build_list_info(store, capsys):
    rc = cli_main(
        [
            "build",
            "--env",
            "Hopper-v5",
            "--kind",
            "random",
            "--steps",
            "100",
            "--id",
            "local/hopper/cli-v0",
            "--ref-max-score",
            "123.0",
            "--seed",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "100 steps" in out
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "local/hopper/cli-v0" in out and TINY_ID in out and "123.00" in out
    assert cli_main(["info", "local/hopper/cli-v0"]) == 0
    out = capsys.readouterr().out
    assert "Hopper-v5" in out and "ref_max_score:" in out and "123.0" in out
    assert cli_main(["info", "local/nope/none-v0"]) == 1
    # an existing id is not overwritten silently
    assert (
        cli_main(
            [
                "build",
                "--env",
                "Hopper-v5",
                "--kind",
                "random",
                "--steps",
                "10",
                "--id",
                "local/hopper/cli-v0",
            ]
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err


def test_the_old_command_line_still_works_without_a_warning(tmp_path):
    """``python -m torchrl_spqr.datasets ...`` (the old command, kept working) runs the new CLI, silently."""
    import subprocess
    import sys

    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "minari")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-W", "always::FutureWarning", "-m", "torchrl_spqr.datasets", *args],
            env=env,
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=300,
        )

    helped = run("--help")
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert helped.stdout.startswith("usage: python -m torchrl_spqr.datasets "), helped.stdout
    assert "{build,list,info}" in helped.stdout
    assert "FutureWarning" not in helped.stderr, helped.stderr[-3000:]
    built = run(
        *("build", "--env", "Hopper-v5", "--kind", "random", "--steps", "30"),
        *("--ref-episodes", "1", "--ref-max-score", "1000", "--id", "local/old/cli-v0"),
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert "built local/old/cli-v0" in built.stdout and "30 steps" in built.stdout
    assert "FutureWarning" not in built.stderr, built.stderr[-3000:]
    assert (tmp_path / "minari" / "local/old/cli-v0/data/main_data.hdf5").is_file()


# --------------------------------------------------------------------------- safe building
def _small(dataset_id, steps=30, seed=1, **kwargs):
    """A tiny random dataset with given reference scores (no reference rollouts)."""
    kwargs = {"ref_min_score": 0.0, "ref_max_score": 1e3, **kwargs}
    return D.build_dataset(dataset_id, "Hopper-v5", "random", steps=steps, seed=seed, **kwargs)


def _store():
    return D.minari_datasets_path()


def _staged():
    """Staging folders left in the store (lock files aside)."""
    root = _store() / _STAGING_DIR
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


def _fingerprint(dataset_id):
    h5 = _local_h5(dataset_id)
    return h5.read_bytes(), minari.load_dataset(dataset_id).storage.metadata["total_steps"]


def _build_cli(*args):
    return cli_main(["build", "--env", "Hopper-v5", "--kind", "random", *args])


def test_overwrite_with_bad_steps_leaves_the_dataset_intact(capsys):
    _small("local/safe/steps-v0")
    before = _fingerprint("local/safe/steps-v0")
    for steps in ("0", "-5"):
        rc = _build_cli("--id", "local/safe/steps-v0", "--steps", steps, "--overwrite")
        err = capsys.readouterr().err
        assert rc == 2 and f"steps={steps}" in err and ">= 1" in err
        assert _fingerprint("local/safe/steps-v0") == before
    assert _staged() == []


@pytest.mark.parametrize(
    ("bad_id", "why"),
    [
        ("local/safe", "no version"),
        ("local", "no namespace"),
        (".", "'.' or '..'"),
        ("..", "'.' or '..'"),
        ("../outside", "'.' or '..'"),
        ("local/../../outside-v0", "'.' or '..'"),
        ("local/./x-v0", "'.' or '..'"),
        ("ABS", "absolute path"),
        ("ABS/x-v0", "absolute path"),
        ("", "empty"),
        ("local//x-v0", "empty component"),
        ("local/safe/", "empty component"),
        ("hopper-random-v0", "no namespace"),
        ("local/a b-v0", "character"),
    ],
)
def test_malformed_ids_are_refused_and_nothing_is_deleted(tmp_path, capsys, bad_id, why):
    if not _exists_locally("local/safe/sibling-v0"):
        _small("local/safe/sibling-v0")
    outside = _store().parent / "outside"  # what ../outside would name
    outside.mkdir(exist_ok=True)
    (outside / "keep.txt").write_text("keep")
    absolute = tmp_path / "abs"
    absolute.mkdir()
    (absolute / "keep.txt").write_text("keep")
    bad_id = bad_id.replace("ABS", str(absolute))
    before = sorted(minari.list_local_datasets())
    rc = _build_cli("--id", bad_id, "--steps", "10", "--overwrite")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "namespace/name-vN" in err and why in err
    assert (outside / "keep.txt").read_text() == "keep"
    assert (absolute / "keep.txt").read_text() == "keep"
    assert sorted(minari.list_local_datasets()) == before
    assert _exists_locally("local/safe/sibling-v0") and _exists_locally(TINY_ID)
    with pytest.raises(ValueError, match="namespace/name-vN"):  # the API and the loader too
        D.build_dataset(bad_id, "Hopper-v5", "random", steps=10, overwrite=True)
    with pytest.raises(ValueError, match="namespace/name-vN"):
        D.load_offline_dataset(bad_id, batch_size=4, download=False)


def test_ids_resolving_outside_the_store_or_naming_more_than_a_dataset(tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    (outside / "data").mkdir(parents=True)
    (outside / "data" / "keep.txt").write_text("keep")
    (_store() / "local" / "link").mkdir(parents=True, exist_ok=True)
    (_store() / "local" / "link" / "escape-v0").symlink_to(outside)
    rc = _build_cli("--id", "local/link/escape-v0", "--steps", "10", "--overwrite")
    assert rc == 2 and "outside the Minari store" in capsys.readouterr().err
    assert (outside / "data" / "keep.txt").read_text() == "keep"

    # a versioned id that names a namespace folder holding datasets: not replaced
    _small("local/nsv-v1/inner-v0")
    rc = _build_cli("--id", "local/nsv-v1", "--steps", "10", "--overwrite")
    assert rc == 2 and "not a single Minari dataset folder" in capsys.readouterr().err
    assert _exists_locally("local/nsv-v1/inner-v0")
    # an id inside another dataset's folder
    rc = _build_cli("--id", "local/nsv-v1/inner-v0/deeper-v0", "--steps", "10")
    assert rc == 2 and "inside the folder of the dataset" in capsys.readouterr().err
    # a namespace component that is a file
    (_store() / "local" / "afile").write_text("x")
    rc = _build_cli("--id", "local/afile/x-v0", "--steps", "10")
    assert rc == 2 and "is a file, not a namespace folder" in capsys.readouterr().err
    assert (_store() / "local" / "afile").read_text() == "x"
    assert _staged() == []


def test_overwrite_replaces_the_data():
    _small("local/safe/replace-v0", steps=30, seed=1)
    old_obs = _episodes("local/safe/replace-v0")[0].observations
    ds = _small("local/safe/replace-v0", steps=45, seed=2, overwrite=True)
    assert ds.storage.metadata["total_steps"] == 45
    eps = _episodes("local/safe/replace-v0")
    assert sum(len(e.rewards) for e in eps) == 45
    assert not np.array_equal(eps[0].observations, old_obs)
    data = D.load_offline_dataset("local/safe/replace-v0", batch_size=4, download=False)
    assert data.num_transitions == 45
    assert _staged() == []
    assert not any(_STAGING_DIR in i for i in minari.list_local_datasets())
    # a fresh id lands in place too, with Minari's namespace metadata
    _small("local/fresh/ns-v0")
    assert (_store() / "local" / "fresh" / "namespace_metadata.json").exists()
    assert "local/fresh/ns-v0" in minari.list_local_datasets()


@pytest.mark.parametrize("when", ["before_write", "after_write", "between_renames"])
def test_a_failed_overwrite_leaves_the_old_dataset(monkeypatch, when):
    dataset_id = f"local/safe/crash-{when.replace('_', '-')}-v0"
    _small(dataset_id, steps=30, seed=1)
    before = _fingerprint(dataset_id)
    real_write, real_rename = data_builder._write_minari_dataset, os.rename

    def write(*args, **kwargs):
        if when == "after_write":
            real_write(*args, **kwargs)
        raise RuntimeError("build step failed (test)")

    def rename(src, dst):
        if f"{os.sep}new{os.sep}" in str(src):  # the new dataset into place: fail
            raise OSError("rename failed (test)")
        return real_rename(src, dst)

    if when == "between_renames":
        monkeypatch.setattr(os, "rename", rename)
    else:
        monkeypatch.setattr(data_builder, "_write_minari_dataset", write)
    with pytest.raises((RuntimeError, OSError), match="failed \\(test\\)"):
        _small(dataset_id, steps=45, seed=2, overwrite=True)
    monkeypatch.undo()
    assert _fingerprint(dataset_id) == before
    assert _staged() == []
    assert not any(_STAGING_DIR in i for i in minari.list_local_datasets())
    assert D.load_offline_dataset(dataset_id, batch_size=4, download=False).num_transitions == 30


_KILLED_BUILD = """
import os, sys
from torchrl_spqr.data import builder as D
when, dataset_id = sys.argv[1], sys.argv[2]
if when == "between_renames":
    real = os.rename
    def rename(src, dst):
        if os.sep + "new" + os.sep in str(src):
            os._exit(17)  # killed: the old dataset is aside, the new one not yet in place
        real(src, dst)
    os.rename = rename
else:
    real_write = D._write_minari_dataset
    def write(*args, **kwargs):
        real_write(*args, **kwargs)
        os._exit(17)  # killed with the new dataset written aside, not marked complete
    D._write_minari_dataset = write
D.build_dataset(dataset_id, "Hopper-v5", "random", steps=45, seed=2, ref_min_score=0.0,
                ref_max_score=1e3, overwrite=True)
"""


@pytest.mark.parametrize("when", ["during_write", "between_renames"])
def test_a_killed_overwrite_leaves_a_complete_dataset(when):
    import subprocess
    import sys

    dataset_id = f"local/safe/killed-{when.replace('_', '-')}-v0"
    _small(dataset_id, steps=30, seed=1)
    before = _fingerprint(dataset_id)
    env = {**os.environ, "MINARI_DATASETS_PATH": str(_store())}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_BUILD, when, dataset_id],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert len(_staged()) == 1  # what the killed build left
    assert not any(_STAGING_DIR in i for i in minari.list_local_datasets())
    if when == "between_renames":
        assert not _exists_locally(dataset_id)  # neither in place: recovery is needed
    recovered = (
        pytest.warns(UserWarning, match="interrupted build")
        if when == "between_renames"
        else contextlib.nullcontext()
    )
    with recovered:  # the next load settles what the killed build left
        data = D.load_offline_dataset(dataset_id, batch_size=4, download=False)
    assert _staged() == []
    if when == "during_write":  # the old dataset, untouched
        assert _fingerprint(dataset_id) == before and data.num_transitions == 30
    else:  # the old one was aside, the new one complete: the new one is installed
        assert data.num_transitions == 45
        assert minari.load_dataset(dataset_id).storage.metadata["total_steps"] == 45


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupted_hdf5_file_gives_a_clear_error(tmp_path, capsys, damage):
    dataset_id = f"local/corrupt/{damage}-v0"
    _small(dataset_id)
    h5 = _local_h5(dataset_id)
    raw = h5.read_bytes()
    h5.write_bytes(
        {"truncated": raw[: len(raw) // 2], "garbage": os.urandom(len(raw)), "empty": b""}[damage]
    )
    with pytest.raises(D.DatasetCorruptedError) as info:
        D.load_offline_dataset(dataset_id, batch_size=4, root=str(tmp_path), download=False)
    msg = str(info.value)
    assert str(h5) in msg and "--overwrite" in msg and dataset_id in msg
    assert isinstance(info.value, ValueError)
    assert cli_main(["info", dataset_id]) == 2
    assert str(h5) in capsys.readouterr().err
    # the dataset is rebuilt over the damaged one
    assert _small(dataset_id, steps=20, overwrite=True).storage.metadata["total_steps"] == 20
    assert D.load_offline_dataset(dataset_id, batch_size=4, root=str(tmp_path)).num_transitions


def test_broken_metadata_and_a_damaged_part(tmp_path):
    _small("local/corrupt/meta-v0")
    meta = _local_h5("local/corrupt/meta-v0").parent / "metadata.json"
    meta.write_text("{not json")
    with pytest.raises(D.DatasetCorruptedError, match="local/corrupt/meta-v0"):
        D.load_offline_dataset("local/corrupt/meta-v0", batch_size=4, download=False)
    # a part of medium-expert that is damaged is named as well
    _small("local/corrupt/part-v0")
    _local_h5("local/corrupt/part-v0").write_bytes(b"\0" * 100)
    with pytest.raises(D.DatasetCorruptedError, match="main_data.hdf5"):
        D.build_dataset(
            "local/corrupt/me-v0", None, "medium-expert", parts=[TINY_ID, "local/corrupt/part-v0"]
        )
    assert not _exists_locally("local/corrupt/me-v0")


def _set_metadata(dataset_id, **values):
    import json

    path = _local_h5(dataset_id).parent / "metadata.json"
    meta = json.loads(path.read_text())
    meta.update(values)
    path.write_text(json.dumps(meta))


def test_reference_scores_never_give_nan(capsys):
    # zero reference episodes: refused before anything is built
    rc = _build_cli("--id", "local/refs/zero-v0", "--steps", "10", "--ref-episodes", "0")
    assert rc == 2 and "ref_episodes=0" in capsys.readouterr().err
    assert not _exists_locally("local/refs/zero-v0")
    # a zero-width, inverted or non-finite given range
    for lo, hi in (("5", "5"), ("5", "1"), ("nan", "10"), ("0", "inf")):
        rc = _build_cli(
            "--id", "local/refs/range-v0", "--steps", "10",
            "--ref-min-score", lo, "--ref-max-score", hi,
        )  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and ("ref_max_score > ref_min_score" in err or "finite" in err), err
    assert not _exists_locally("local/refs/range-v0")
    # datasets that already record such values (older builds, hand edits): refused on load
    _small("local/refs/recorded-v0")
    for values, match in (
        ({"ref_min_score": float("nan")}, "not a finite number"),
        ({"ref_min_score": 7.0, "ref_max_score": 7.0}, "ref_max_score > ref_min_score"),
        ({"ref_min_score": 9.0, "ref_max_score": 1.0}, "ref_max_score > ref_min_score"),
    ):
        _set_metadata("local/refs/recorded-v0", **values)
        with pytest.raises(ValueError, match=match):
            D.load_offline_dataset("local/refs/recorded-v0", batch_size=4, download=False)
    # no reference scores at all: loads, and normalized_score says so (no NaN)
    _set_metadata("local/refs/recorded-v0", ref_min_score=None, ref_max_score=None)
    data = D.load_offline_dataset("local/refs/recorded-v0", batch_size=4, download=False)
    assert data.ref_min_score is None and data.ref_max_score is None
    with pytest.raises(ValueError, match="no reference scores"):
        data.normalized_score(1.0)
    with pytest.raises(ValueError, match="max > min"):  # an inverted range, given by hand
        D.normalized_score(1.0, 5.0, 1.0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            D.load_offline_dataset("local/refs/recorded-v0", batch_size=bad, download=False)


def test_builder_arguments_are_checked_before_anything_is_built(tmp_path, capsys):
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    cfg = {"algorithm": "sac_ens", "env": {"name": "Hopper-v5", "max_episode_steps": 7}}
    no_buffer = tmp_path / "no_buffer"
    save_checkpoint(no_buffer, {"loss": {}, "config": cfg})
    damaged = tmp_path / "damaged"
    (damaged / "checkpoint").mkdir(parents=True)
    (damaged / "checkpoint" / "state.pt").write_bytes(b"garbage" * 10)
    cases = [
        (["--kind", "random", "--env", "Nope-v0", "--steps", "10"], "'Nope-v0'"),
        (["--kind", "random", "--env", "Hopper-v5", "--steps", "10", "--seed", "-1"], "seed=-1"),
        (["--kind", "random", "--env", "Hopper-v5", "--max-episode-steps", "0"], "max_episode"),
        (["--kind", "random", "--steps", "10"], "needs env_id"),
        (["--kind", "random", "--env", "Hopper-v5", "--policy-run", "x"], "does not use policy"),
        (["--kind", "random", "--env", "Hopper-v5", "--noise", "0.1"], "does not use noise"),
        (["--kind", "medium", "--env", "Hopper-v5", "--steps", "10"], "needs a policy"),
        (
            ["--kind", "medium", "--env", "Hopper-v5", "--policy-run", str(tmp_path / "nope")],
            "no such folder",
        ),
        (
            ["--kind", "medium", "--env", "Hopper-v5", "--policy-run", str(empty_run)],
            "--policy-run",
        ),
        (
            ["--kind", "expert", "--env", "Hopper-v5", "--policy-run", "x", "--noise", "-1"],
            "noise=-1",
        ),
        (["--kind", "medium-replay"], "needs source_run"),
        (["--kind", "medium-replay", "--source-run", str(tmp_path / "nope")], "no such folder"),
        (["--kind", "medium-replay", "--source-run", str(empty_run)], "cannot read its checkp"),
        (["--kind", "medium-replay", "--source-run", str(no_buffer)], "cannot read its replay"),
        (["--kind", "medium-replay", "--source-run", str(damaged)], "cannot read its checkp"),
        (["--kind", "medium-replay", "--source-run", str(no_buffer), "--steps", "0"], "steps=0"),
        (["--kind", "full-replay"], "needs expert_run"),
        (["--kind", "medium-expert", "--parts", "local/x/a-v0", "local/x/b-v0"], "not available"),
        (["--kind", "medium-expert", "--parts", "local/x", "local/x/b-v0"], "namespace/name-vN"),
    ]
    for args, match in cases:
        rc = cli_main(["build", "--id", "local/args/case-v0", *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and match in err, (args, err)
        assert "Traceback" not in err
    assert not _exists_locally("local/args/case-v0") and _staged() == []
    with pytest.raises(SystemExit):  # argparse: an unknown kind
        cli_main(["build", "--id", "local/args/case-v0", "--kind", "nope"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kind='nope'"):
        D.build_dataset("local/args/case-v0", "Hopper-v5", "nope", steps=10)
    with pytest.raises(ValueError, match="steps=2.5"):
        D.build_dataset("local/args/case-v0", "Hopper-v5", "random", steps=2.5)


def test_run_folders_are_read_only_through_a_reader(tmp_path):
    """The data layer reads run folders through a RunReader (the CLI passes RunFolders)."""
    run = tmp_path / "run"
    run.mkdir()
    cases = [
        ("medium", "Hopper-v5", {"steps": 10, "policy": str(run)}, "policy"),
        ("medium-replay", None, {"source_run": str(run)}, "source_run"),
        ("full-replay", None, {"expert_run": run}, "expert_run"),
    ]
    for kind, env_id, kwargs, name in cases:
        with pytest.raises(
            ValueError,
            match=rf"{name}='{re.escape(str(run))}' \(--[-a-z]+\) is a run folder: pass "
            r"runs=torchrl_spqr\.training\.restore\.RunFolders\(\)",
        ):
            D.build_dataset("local/args/reader-v0", env_id, kind, **kwargs)
    with pytest.raises(ValueError, match="runs=<object .*expected a RunReader"):
        D.build_dataset(
            "local/args/reader-v0", None, "medium-replay", source_run=str(run), runs=object()
        )
    assert not _exists_locally("local/args/reader-v0") and _staged() == []
    assert isinstance(RunFolders(), D.RunReader)
    # with the reader, the folder is read (and, holding no checkpoint, refused by name)
    with pytest.raises(ValueError, match="--source-run .*cannot read its checkpoint"):
        D.build_dataset(
            "local/args/reader-v0", None, "medium-replay", source_run=str(run), runs=RunFolders()
        )


# --- issue 18: reward transform at load ---


def test_reward_transform_is_applied_once_at_load_and_leaves_the_data_alone(store):
    st = _storage_td
    plain = D.load_offline_dataset(TINY_ID, batch_size=8, root=str(store["root"] / "trl"))
    assert (plain.reward_scale, plain.reward_shift) == (1.0, 0.0)
    r0 = st(plain.buffer)["next", "reward"].clone()
    data = D.load_offline_dataset(
        TINY_ID, batch_size=8, root=str(store["root"] / "trl"), reward_scale=3.0, reward_shift=-0.5
    )
    assert (data.reward_scale, data.reward_shift) == (3.0, -0.5)
    r1 = st(data.buffer)["next", "reward"]
    torch.testing.assert_close(r1, (r0.double() * 3.0 - 0.5).to(r0.dtype))
    for _ in range(3):  # sampling does not transform again
        data.buffer.sample()
    torch.testing.assert_close(st(data.buffer)["next", "reward"], r1)
    # the dataset and TorchRL's converted cache are unchanged: a fresh load sees the source
    again = D.load_offline_dataset(TINY_ID, batch_size=8, root=str(store["root"] / "trl"))
    torch.testing.assert_close(st(again.buffer)["next", "reward"], r0)
    eps = _episodes(TINY_ID)
    np.testing.assert_array_equal(r0.reshape(-1).numpy(), np.concatenate([e.rewards for e in eps]))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"reward_scale": float("nan")}, "reward_scale"),
        ({"reward_scale": 0.0}, "reward_scale"),
        ({"reward_scale": "2"}, "reward_scale"),
        ({"reward_shift": float("inf")}, "reward_shift"),
    ],
)
def test_bad_reward_transform_arguments(store, kwargs, name):
    with pytest.raises(ValueError, match=name):
        D.load_offline_dataset(TINY_ID, batch_size=8, **kwargs)
