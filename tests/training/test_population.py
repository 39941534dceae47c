"""Population training (issue 19): K agents in one batched update equal K single runs."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.modules import ProbabilisticActor, TanhNormal
from torchrl.objectives import SoftUpdate

from torchrl_spqr import QEnsemble, SACNLoss, SPQRLoss, make_q_member
from torchrl_spqr.training.population import (
    PopulationReplayBuffer,
    PopulationUpdate,
    build_population,
)

OBS, ACT, HIDDEN, N, B = 5, 2, 16, 3, 8
ATOL = 1e-5


def make_actor() -> ProbabilisticActor:
    net = nn.Sequential(
        nn.Linear(OBS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2 * ACT), NormalParamExtractor()
    )
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=Bounded(-1.0, 1.0, (ACT,)),
        distribution_class=TanhNormal,
        return_log_prob=True,
    )


def make_loss(seed: int, beta: float | None = 1.0, n: int = N, **spqr_kwargs):
    """One agent built as a single run builds it (``beta=None``: bare SACNLoss)."""
    torch.manual_seed(seed)
    critics = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(HIDDEN, HIDDEN)), n)
    loss = SACNLoss(make_actor(), critics, action_spec=Bounded(-1.0, 1.0, (ACT,)))
    if beta is None:
        return loss
    spqr_kwargs.setdefault("diagnostics_interval", 0)
    return SPQRLoss(loss, beta=beta, **spqr_kwargs)


def make_batch(seed: int, b: int = B) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "observation": torch.randn(b, OBS, generator=g),
            "action": torch.rand(b, ACT, generator=g) * 1.98 - 0.99,
            "next": {
                "observation": torch.randn(b, OBS, generator=g),
                "reward": torch.randn(b, 1, generator=g),
                "done": torch.zeros(b, 1, dtype=torch.bool),
                "terminated": torch.rand(b, 1, generator=g) < 0.2,
            },
        },
        [b],
    )


def single_run(loss, batches, seed, *, lr=3e-4, tau=0.005, max_grad_norm=None):
    """The usual TorchRL loop: sum the loss_* entries, backward, (clip), Adam step, SoftUpdate."""
    opt = torch.optim.Adam(loss.parameters(), lr=lr)
    updater = SoftUpdate(loss, tau=tau)
    groups = {}
    for name, p in loss.named_parameters():
        g = next((m for m in ("qvalue", "actor", "alpha") if m in name), "other")
        groups.setdefault(g, []).append(p)
    torch.manual_seed(seed)
    for batch in batches:
        out = loss(batch.clone())
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
        opt.zero_grad(set_to_none=True)
        total.backward()
        if max_grad_norm is not None:
            for params in groups.values():
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        updater.step()
    return opt


def assert_agent_equals(pop: PopulationUpdate, k: int, loss, opt) -> None:
    single = TensorDict.from_module(loss)
    state = pop.state[k]
    checked = 0
    for key, value in state.items(True, True):
        torch.testing.assert_close(value.data, single.get(key).data, atol=ATOL, rtol=0)
        checked += 1
    assert checked > 10
    params = dict(loss.named_parameters())
    adam = pop.adam_state(k)
    assert set(adam) == set(params)
    for name, p in params.items():
        for entry in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(adam[name][entry], opt.state[p][entry], atol=ATOL, rtol=1e-4)
        assert float(adam[name]["step"]) == float(opt.state[p]["step"])


@pytest.mark.parametrize("pairs", ["next_policy", "data"])
def test_population_equals_two_single_runs(pairs):
    """The issue's check: K=2 (different inits, betas, batches) == two single runs, 5 updates."""
    seed, steps, betas = 7, 5, (0.0, 1.0)
    batches = [[make_batch(100 * k + i) for i in range(steps)] for k in range(2)]
    pop = PopulationUpdate(
        [make_loss(k, beta, pairs=pairs) for k, beta in enumerate(betas)],
        randomness="same",
        optimizer_kwargs={"foreach": True},
    )
    assert pop.beta.tolist() == list(betas)
    alpha0 = pop.state.get(("loss_module", "log_alpha")).detach().clone()
    torch.manual_seed(seed)
    for i in range(steps):
        out = pop(torch.stack([batches[0][i], batches[1][i]]))
    assert out["loss_spqr"][0] == 0 and out["loss_spqr"][1] > 0
    for k, beta in enumerate(betas):
        loss = make_loss(k, beta, pairs=pairs)
        opt = single_run(loss, batches[k], seed)
        assert_agent_equals(pop, k, loss, opt)
    # the temperatures moved (and separately)
    alpha = pop.state.get(("loss_module", "log_alpha"))
    assert (alpha - alpha0).abs().min() > 0


def test_population_equals_single_runs_with_per_agent_clipping():
    """Grad-norm clipping is per agent and per group, as clip_grad_norm_ in each single run."""
    seed, steps = 3, 5
    batches = [[make_batch(10 * k + i) for i in range(steps)] for k in range(2)]
    pop = PopulationUpdate(
        [make_loss(k, None) for k in range(2)],
        randomness="same",
        max_grad_norm=0.05,
        optimizer_kwargs={"foreach": True},
    )
    torch.manual_seed(seed)
    for i in range(steps):
        pop(torch.stack([batches[0][i], batches[1][i]]))
    for k in range(2):
        loss = make_loss(k, None)
        opt = single_run(loss, batches[k], seed, max_grad_norm=0.05)
        assert_agent_equals(pop, k, loss, opt)


def test_beta_zero_agent_gets_exactly_zero_spqr_gradient():
    pop = PopulationUpdate([make_loss(0, 0.0), make_loss(1, 2.0)])
    batch = torch.stack([make_batch(0), make_batch(1)])
    out = pop.loss(batch)
    out["loss_spqr"].sum().backward()
    critic = pop.state.get(("loss_module", "qvalue_network_params"))
    grads = [p.grad for p in critic.values(True, True)]
    assert all(g is not None for g in grads)
    assert all(torch.count_nonzero(g[0]) == 0 for g in grads)
    assert all(torch.count_nonzero(g[1]) > 0 for g in grads)


def test_randomness_same_vs_different():
    """Two identical agents on the same batch: 'same' draws agree, 'different' do not."""
    batch = make_batch(0)
    for randomness, equal in (("same", True), ("different", False)):
        pop = PopulationUpdate([make_loss(0, None), make_loss(0, None)], randomness=randomness)
        out = pop.loss(torch.stack([batch, batch]))
        assert torch.equal(out["entropy"][0], out["entropy"][1]) is equal


def test_build_population_seeds_each_agent():
    pop = build_population(lambda seed: make_loss(seed, 1.0), [4, 9])
    for k, seed in enumerate([4, 9]):
        ref = TensorDict.from_module(make_loss(seed, 1.0))
        key = ("loss_module", "qvalue_network_params", "module", "net", "0", "weight")
        assert torch.equal(pop.state.get(key)[k], ref.get(key))
    with pytest.raises(ValueError, match="at least one seed"):
        build_population(lambda seed: make_loss(seed), [])


def test_write_agent_and_act():
    pop = PopulationUpdate([make_loss(0, 0.0), make_loss(1, 1.0)])
    pop(torch.stack([make_batch(0), make_batch(1)]))
    dest = pop.write_agent(1, make_loss(5, 0.0))
    mine = TensorDict.from_module(dest)
    for key, value in pop.state[1].items(True, True):
        assert torch.equal(mine.get(key), value.data)
    assert float(dest.beta) == 1.0
    obs = TensorDict({"observation": torch.randn(2, 4, OBS)}, [2, 4])
    act = pop.act(obs)
    assert act["action"].shape == (2, 4, ACT)
    with pytest.raises(ValueError, match=r"\[K=2, \.\.\.\]"):
        pop.act(TensorDict({"observation": torch.randn(3, OBS)}, [3]))
    with pytest.raises(IndexError, match="out of range"):
        pop.write_agent(2, dest)
    with pytest.raises(ValueError, match="build it like the agents"):
        pop.write_agent(0, make_loss(0, None))


def test_bad_input_is_refused_with_clear_errors():
    with pytest.raises(ValueError, match="at least one agent"):
        PopulationUpdate([])
    with pytest.raises(TypeError, match="LossModules"):
        PopulationUpdate([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="shares one loss class"):
        PopulationUpdate([make_loss(0, 1.0), make_loss(1, None)])
    with pytest.raises(ValueError, match="num_qvalue_nets=4 for agent 1"):
        PopulationUpdate([make_loss(0, 1.0), make_loss(1, 1.0, n=4)])
    with pytest.raises(ValueError, match="pairs='data' for agent 1"):
        PopulationUpdate([make_loss(0, 1.0), make_loss(1, 1.0, pairs="data")])
    with pytest.raises(ValueError, match="diagnostics_interval=0"):
        PopulationUpdate([make_loss(0, 1.0, diagnostics_interval=1)])
    with pytest.raises(ValueError, match="add_to=None"):
        PopulationUpdate([make_loss(0, 1.0, add_to="loss_qvalue")])
    with pytest.raises(ValueError, match="beta schedule"):
        PopulationUpdate([make_loss(0, lambda step: 1.0)])
    other_gamma = make_loss(1, None)
    other_gamma.gamma.fill_(0.9)
    with pytest.raises(ValueError, match="gamma differs between agent 1"):
        PopulationUpdate([make_loss(0, None), other_gamma])
    with pytest.raises(ValueError, match="randomness"):
        PopulationUpdate([make_loss(0, None)], randomness="error")
    with pytest.raises(ValueError, match="lr keys"):
        PopulationUpdate([make_loss(0, None)], lr={"critc": 1e-3})
    with pytest.raises(ValueError, match="tau"):
        PopulationUpdate([make_loss(0, None)], tau=0.0)
    pop = PopulationUpdate([make_loss(0, None), make_loss(1, None)])
    with pytest.raises(ValueError, match=r"\[K=2, B, \.\.\.\]"):
        pop(torch.stack([make_batch(0), make_batch(1), make_batch(2)]))
    with pytest.raises(ValueError, match=r"\[K=2, B, \.\.\.\]"):
        pop(make_batch(0))
    with pytest.raises(TypeError, match="TensorDict"):
        pop({"observation": torch.randn(2, B, OBS)})


def test_cudagraphs_refused_on_cpu():
    with pytest.raises(ValueError, match="needs a CUDA device.*cpu"):
        PopulationUpdate([make_loss(0, None)], cudagraphs=True)
    with pytest.warns(UserWarning, match="without CUDA graphs"):
        pop = PopulationUpdate([make_loss(0, None)], cudagraphs="auto")
    pop(make_batch(0).unsqueeze(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_population_on_cuda_keeps_everything_on_the_agents_device():
    """Losses built on CUDA: the per-agent betas, the stacked state and the Adam state on
    CUDA too (the betas were once a CPU buffer, which broke the first update and the
    batched evaluation's ``td.to(device)`` on the first GPU run); update, act and
    write_agent run, and the update moves every agent's critics."""
    cuda = torch.device("cuda")
    pop = PopulationUpdate([make_loss(k, b).to(cuda) for k, b in enumerate((0.0, 1.0))])
    assert pop.device.type == "cuda" and pop.beta.device.type == "cuda"
    assert all(v.device.type == "cuda" for v in pop.state.values(True, True))
    before = pop.state.clone()
    batch = torch.stack([make_batch(k) for k in range(2)]).to(cuda)
    out = pop(batch)
    for key in ("loss_qvalue", "loss_actor", "loss_spqr"):
        assert out[key].device.type == "cuda" and out[key].shape == (2,)
        assert torch.isfinite(out[key]).all(), key
    assert out["loss_spqr"][0] == 0 and out["loss_spqr"][1] > 0  # beta 0, beta 1
    moved = [
        bool((before.get(k) != v).any(-1).reshape(2, -1).any(-1).all())
        for k, v in pop.state.items(True, True)
        if "qvalue_network_params" in str(k) and "target" not in str(k)
    ]
    assert moved and all(moved)
    states = [st["exp_avg"] for st in pop.optimizer.state.values()]
    assert states and all(t.device.type == "cuda" for t in states)
    with torch.no_grad():
        act = pop.act(batch.select("observation").to(cuda))
    assert act["action"].device.type == "cuda" and act["action"].shape == (2, B, ACT)
    agent = pop.write_agent(1, make_loss(5, 0.0).to(cuda))
    assert float(agent.beta) == 1.0


def test_replay_buffer_keeps_agents_apart():
    rb = PopulationReplayBuffer(3, capacity=5)
    with pytest.raises(RuntimeError, match="empty"):
        rb.sample(4)
    for t in range(3):  # 12 transitions per agent into 5 slots: circular
        agent = torch.arange(3).unsqueeze(-1).expand(3, 4)
        step = torch.full((3, 4), t) * 4 + torch.arange(4)
        rb.extend(TensorDict({"agent": agent, "step": step}, [3, 4]))
    assert len(rb) == 5
    sample = rb.sample(64)
    assert sample.batch_size == (3, 64)
    assert torch.equal(sample["agent"], torch.arange(3).unsqueeze(-1).expand(3, 64))
    assert sample["step"].min() >= 7  # only the last 5 of 12 remain
    # the agents' indices are drawn independently
    assert not torch.equal(sample["step"][0], sample["step"][1])
    with pytest.raises(ValueError, match="K=3 rows"):
        rb.extend(TensorDict({"agent": torch.zeros(2, 4)}, [2, 4]))
    with pytest.raises(ValueError, match=r"\[K, T\]"):
        rb.extend(TensorDict({"agent": torch.zeros(3)}, [3]))
    fresh = PopulationReplayBuffer(3, capacity=5)
    fresh.load_state_dict(rb.state_dict())
    assert len(fresh) == 5
    with pytest.raises(ValueError, match="expected"):
        PopulationReplayBuffer(2, capacity=5).load_state_dict(rb.state_dict())


@pytest.mark.slow  # compiling forward and backward: about 50 s on 2 loaded cores
def test_compiled_update_equals_eager():
    """torch.compile of the population update gives the eager parameters after 2 updates
    (the default suite compiles the population's act below)."""
    batches = [torch.stack([make_batch(i), make_batch(10 + i)]) for i in range(2)]
    results = []
    for compile_ in (False, True):
        pop = PopulationUpdate(
            [make_loss(0, 0.0), make_loss(1, 1.0)], randomness="same", compile=compile_
        )
        torch.manual_seed(0)
        for batch in batches:
            pop(batch.clone())
        results.append(pop.state.data.clone())
    for key, value in results[0].items(True, True):
        torch.testing.assert_close(results[1].get(key), value, atol=ATOL, rtol=0)


def test_compiled_act_equals_eager_and_draws_per_agent():
    """compile=True compiles act too: the deterministic actions equal the eager ones, and
    under exploration identical agents on identical observations draw different actions
    (randomness='different' survives compilation); compile=False leaves act eager."""
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    obs = torch.stack([make_batch(0, 6)] * 3).select("observation")
    eager = PopulationUpdate([make_loss(0, 0.0) for _ in range(3)])
    compiled = PopulationUpdate([make_loss(0, 0.0) for _ in range(3)], compile=True)
    assert eager._act == eager._act_eager and compiled._act != compiled._act_eager
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        ref, got = eager.act(obs), compiled.act(obs)
    torch.testing.assert_close(got["action"], ref["action"], atol=1e-5, rtol=0)
    assert torch.equal(ref["action"][0], ref["action"][1])  # the agents are identical
    with set_exploration_type(ExplorationType.RANDOM):
        drawn = compiled.act(obs)["action"]
    assert drawn.shape == (3, 6, ACT) and drawn.abs().max() <= 1
    assert not torch.allclose(drawn[0], drawn[1]) and not torch.allclose(drawn[1], drawn[2])


@pytest.mark.parametrize("loss_class", ["ReferenceREDQLoss", "CQLNLoss"])
def test_other_ensemble_losses_equal_single_runs(loss_class):
    """REDQ (random target subsets, delayed policy) and CQL-N also batch exactly."""
    import torchrl_spqr

    cls = getattr(torchrl_spqr, loss_class)
    kwargs = {"policy_update_delay": 2} if loss_class == "ReferenceREDQLoss" else {}

    def make(seed):
        torch.manual_seed(seed)
        critics = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(HIDDEN, HIDDEN)), N)
        return cls(make_actor(), critics, action_spec=Bounded(-1.0, 1.0, (ACT,)), **kwargs)

    seed, steps = 5, 4
    batches = [[make_batch(20 * k + i) for i in range(steps)] for k in range(2)]
    pop = PopulationUpdate(
        [make(0), make(1)], randomness="same", optimizer_kwargs={"foreach": True}
    )
    torch.manual_seed(seed)
    for i in range(steps):
        pop(torch.stack([batches[0][i], batches[1][i]]))
    for k in range(2):
        loss = make(k)
        opt = single_run(loss, batches[k], seed)
        assert_agent_equals(pop, k, loss, opt)


def test_loss_that_cannot_be_vmapped_is_named():
    """EDAC's diversity term takes gradients inside the loss, which torch.vmap refuses."""
    from torchrl_spqr import EDACLoss

    def make(seed):
        torch.manual_seed(seed)
        critics = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(HIDDEN, HIDDEN)), N)
        return EDACLoss(make_actor(), critics, action_spec=Bounded(-1.0, 1.0, (ACT,)))

    pop = PopulationUpdate([make(0), make(1)])
    with pytest.raises(RuntimeError, match="EDACLoss cannot run under torch.vmap"):
        pop(torch.stack([make_batch(0), make_batch(1)]))


def test_state_dict_round_trip_resumes_exactly():
    """Saving the population (module + optimizer) and loading it into a fresh one resumes it."""
    import io

    batch = torch.stack([make_batch(0), make_batch(1)])
    pop = PopulationUpdate([make_loss(0, 0.0), make_loss(1, 1.0)], randomness="same")
    pop(batch)
    buffer = io.BytesIO()
    torch.save({"pop": pop.state_dict(), "optim": pop.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    fresh = PopulationUpdate([make_loss(5, 0.0), make_loss(6, 0.0)], randomness="same")
    fresh.load_state_dict(saved["pop"])
    fresh.optimizer.load_state_dict(saved["optim"])
    assert fresh.beta.tolist() == [0.0, 1.0]
    for p in (pop, fresh):
        torch.manual_seed(1)
        p(batch)
    for key, value in pop.state.items(True, True):
        assert torch.equal(value, fresh.state.get(key)), key


def test_state_dict_carries_the_shared_counter():
    """REDQ's update counter (shared by the agents, held by the template) is part of the
    population's state_dict; an older dict without it still loads strictly; a dict with an
    unknown or misshapen shared entry is refused by load_state_dict."""
    from torchrl_spqr import ReferenceREDQLoss

    def make(seed):
        torch.manual_seed(seed)
        critics = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(HIDDEN,)), N)
        return ReferenceREDQLoss(
            make_actor(), critics, action_spec=Bounded(-1.0, 1.0, (ACT,)), policy_update_delay=2
        )

    pop = PopulationUpdate([make(0), make(1)])
    batch = torch.stack([make_batch(0), make_batch(1)])
    for _ in range(3):
        pop(batch)
    assert int(pop.shared_state()["update_count"]) == 3
    saved = pop.state_dict()
    assert int(saved["shared_state.update_count"]) == 3
    fresh = PopulationUpdate([make(5), make(6)])
    fresh.load_state_dict(saved)
    assert int(fresh.shared_state()["update_count"]) == 3
    assert "shared_state.update_count" in saved  # loading does not consume the caller's dict

    old = {k: v for k, v in saved.items() if not k.startswith("shared_state.")}
    older = PopulationUpdate([make(5), make(6)])
    older.load_state_dict(old)  # strict: a dict saved before the counter was included
    assert int(older.shared_state()["update_count"]) == 0

    # a run checkpoint of that older version kept the counter in its own "shared" entry
    from torchrl_spqr.training.population.run import _restore_shared
    from torchrl_spqr.training.validation import ConfigError

    _restore_shared(older, {"update_count": torch.tensor(3)}, "ckpt")
    assert int(older.shared_state()["update_count"]) == 3
    with pytest.raises(ConfigError, match="shared loss entry 'not_a_counter'"):
        _restore_shared(older, {"not_a_counter": torch.tensor(3)}, "ckpt")

    with pytest.raises(RuntimeError, match="shared_state.not_a_counter"):
        fresh.load_state_dict({**saved, "shared_state.not_a_counter": torch.zeros(())})
    with pytest.raises(RuntimeError, match="shared_state.update_count"):
        fresh.load_state_dict({**saved, "shared_state.update_count": torch.zeros(2)})


def test_population_runs_the_fused_kernel_and_equals_the_op_by_op_path(monkeypatch):
    """The K agents' critics go through the fused kernel's vmap rule (one K*N ensemble),
    and the update equals the op-by-op critics' (BatchedMLP.use_fused_kernel=False)."""
    from torchrl_spqr.modules import BatchedMLP
    from torchrl_spqr.modules.relu_mlp import _EnsembleReluMLP

    calls = []
    rule = _EnsembleReluMLP.vmap

    def spy(info, in_dims, *args):
        calls.append(info.batch_size)
        return rule(info, in_dims, *args)

    batches = [torch.stack([make_batch(10 * i + k) for k in range(2)]) for i in range(3)]
    states = []
    for fused in (True, False):
        monkeypatch.setattr(BatchedMLP, "use_fused_kernel", fused)
        monkeypatch.setattr(_EnsembleReluMLP, "vmap", staticmethod(spy))
        pop = PopulationUpdate([make_loss(k, 1.0) for k in range(2)], randomness="same")
        calls.clear()
        torch.manual_seed(0)
        for batch in batches:
            pop(batch)
        assert (len(calls) > 0) == fused and set(calls) <= {2}
        states.append(pop.state.detach().clone())
    for key, value in states[0].items(True, True):
        torch.testing.assert_close(value, states[1].get(key), atol=ATOL, rtol=1e-4, msg=str(key))


def test_population_envs_in_process_and_errors():
    """PopulationEnvs: [K] resets, per-agent random actions and steps; bad use is named."""
    from torchrl.envs import GymEnv

    from torchrl_spqr.training.population import PopulationEnvs

    def make(seed):
        env = GymEnv("Pendulum-v1")
        env.set_seed(seed)
        return env

    envs = PopulationEnvs([make(0), make(1)])
    td = envs.reset()
    assert td.batch_size == torch.Size([2])
    assert not torch.equal(td["observation"][0], td["observation"][1])  # own seeds
    td.set("action", envs.random_actions())
    data, nxt = envs.step(td)
    assert data.batch_size == nxt.batch_size == torch.Size([2])
    torch.testing.assert_close(data["next", "observation"], nxt["observation"])
    with pytest.raises(ValueError, match=r"\[K=2\]"):
        envs.step(td[:1])
    envs.close()
    with pytest.raises(ValueError, match="one environment builder per agent"):
        PopulationEnvs([make(0), make(1)], [lambda: make(0)], parallel=True)
    with pytest.raises(ValueError, match="at least one environment"):
        PopulationEnvs([])


@pytest.mark.slow  # worker or script processes: about a minute on 2 busy cores
def test_parallel_population_envs_leave_stop_signals_to_the_main_process():
    """Under the scripts' stop_signals, a population's ParallelEnv workers ignore SIGINT and
    SIGTERM (sent to every process of a group or job): the main process stops the run."""
    import multiprocessing
    import os
    import signal
    import time
    from functools import partial

    from torchrl_spqr.training.builders import make_environment
    from torchrl_spqr.training.population import PopulationEnvs
    from torchrl_spqr.training.stop import stop_signals

    cfg = {"env": {"name": "Pendulum-v1", "max_episode_steps": 30}}
    before = set(multiprocessing.active_children())
    with stop_signals():
        envs = PopulationEnvs(
            [make_environment(cfg, s) for s in (0, 1)],
            [partial(make_environment, cfg, s) for s in (0, 1)],
            parallel=True,
        )
        try:
            td = envs.reset()  # starts the workers
            workers = [p for p in multiprocessing.active_children() if p not in before]
            assert len(workers) == 2
            for p in workers:
                os.kill(p.pid, signal.SIGINT)
                os.kill(p.pid, signal.SIGTERM)
            time.sleep(0.5)
            assert all(p.is_alive() for p in workers)
            td.set("action", envs.random_actions())
            data, _ = envs.step(td)  # the workers still step
            assert data.batch_size == torch.Size([2])
        finally:
            envs.close()


@pytest.mark.parametrize("parallel", [False, True], ids=["in-process", "parallel"])
def test_population_envs_evaluate_equals_each_agents_evaluation(parallel):
    """PopulationEnvs.evaluate (all agents at once, one policy call per step) gives each
    agent the returns evaluate_policy gives it alone, over two evaluations in a row (each
    evaluation environment reset exactly as often)."""
    from functools import partial

    from tensordict.nn import TensorDictModule
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    from torchrl_spqr.training.builders import make_environment
    from torchrl_spqr.training.common import evaluate_policy
    from torchrl_spqr.training.population import PopulationEnvs

    cfg = {"env": {"name": "Pendulum-v1", "max_episode_steps": 30}}
    seeds = (3, 4, 5)

    def policy(k):
        torch.manual_seed(k)
        return TensorDictModule(
            nn.Sequential(nn.Linear(3, 1), nn.Tanh()), ["observation"], ["action"]
        )

    policies = [policy(k) for k in range(3)]

    def batched(td):
        return td.set(
            "action", torch.stack([p(td[k].clone())["action"] for k, p in enumerate(policies)])
        )

    alone = [make_environment(cfg, s) for s in seeds]
    want = [[evaluate_policy(alone[k], policies[k], 2) for k in range(3)] for _ in range(2)]
    envs = PopulationEnvs(
        [make_environment(cfg, s) for s in seeds],
        [partial(make_environment, cfg, s) for s in seeds],
        parallel=parallel,
    )
    try:
        for round_ in range(2):
            with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
                returns = envs.evaluate(batched, 2)
            assert [len(r) for r in returns] == [2, 2, 2]
            for k, r in enumerate(returns):
                mean, _ = want[round_][k]
                assert sum(r) / 2 == pytest.approx(mean, rel=1e-5)
    finally:
        envs.close()
    with pytest.raises(ValueError, match="episodes must be"):
        PopulationEnvs(alone).evaluate(batched, 0)
