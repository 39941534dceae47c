"""The run protocol of a population script: K agents' run folders, one checkpoint, resume.

A population run (``sota_scripts/sac_ens_spqr/sac_ens_spqr_population.py``,
``sota_scripts/redq_spqr/redq_spqr_population.py``) trains the
agents of ``population.seeds x population.beta`` together and writes, for each agent,
the run folder a single run writes (``<run_dir>/beta<b>_N<n>_seed<s>/``: ``metrics.csv``
with the same columns, TorchRL's logs, ``learning_curve.png`` and a ``checkpoint/``
holding the agent's networks and its single-run config, so that
``python -m torchrl_spqr.analysis <run_dir>`` and ``--checkpoint`` work unchanged).

- :func:`resolve_population_config` checks the population config (names and types
  against :class:`~torchrl_spqr.training.config.SACEnsPopulationConfig`) and every
  agent's single-run config (:func:`agent_configs`) with the single script's checks.
- :class:`AgentRun` is :class:`~torchrl_spqr.training.common.RunContext` for one agent
  (counters, rows, owed rows, TorchRL logger) whose state is saved in the population's
  checkpoint instead of its own.
- :class:`PopulationRun` holds the agents' runs, the
  :class:`~torchrl_spqr.training.population.PopulationUpdate` and the
  :class:`~torchrl_spqr.training.population.PopulationReplayBuffer`, and writes one
  checkpoint for all of them (``<run_dir>/checkpoint/``: stacked state, optimiser, the
  loss state the agents share (REDQ's update counter), every agent's counters and owed
  row, RNG states, config; the buffer as a memmap) with
  :func:`~torchrl_spqr.training.checkpoint.save_checkpoint` (atomic, verified, loaded
  without unpickling), every ``checkpoint.interval`` frames and at every exit (the end,
  an error, Ctrl-C, SIGTERM: a stop signal waits for the end of the step, as in a single
  run). ``resume=true`` restores it and cuts every agent's ``metrics.csv``
  back to it, as a single run does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase

from torchrl_spqr.training.checkpoint import (
    capture_rng,
    has_checkpoint,
    load_checkpoint_data,
    restore_rng,
    save_checkpoint,
    truncate_csv,
)
from torchrl_spqr.training.common import (
    RunContext,
    check_resume_config,
    open_run_folder,
    save_history,
)
from torchrl_spqr.training.config import (
    POPULATION_SCHEMAS,
    ConfigError,
    resolve_config,
)
from torchrl_spqr.training.loggers import make_logger
from torchrl_spqr.training.population.replay import PopulationReplayBuffer
from torchrl_spqr.training.population.update import PopulationUpdate
from torchrl_spqr.training.stop import check_stop, steps_running, take_checkpoint_request
from torchrl_spqr.training.typecheck import convert_section, to_plain

__all__ = [
    "AgentRun",
    "AgentSpec",
    "PopulationRun",
    "agent_configs",
    "prepare_population_run",
    "resolve_population_config",
]


@dataclass
class AgentSpec:
    """One agent of a population: its seed, SPQR beta, run-folder name and single-run config."""

    seed: int
    beta: float
    name: str
    cfg: Any


def resolve_population_config(cfg: Any, script: str = "sac_ens_population") -> Any:
    """The population config checked and completed (a ``DictConfig`` read by attribute).

    Names and types are checked against ``POPULATION_SCHEMAS[script]``; the population
    (at least one seed and one beta, no repeats, betas >= 0, no ``add_to``: each agent's
    SPQR term is scaled by its own beta) and every agent's single-run config (the range
    checks of the single script) are checked too. Raises ``ConfigError`` naming the field.
    """
    from omegaconf import OmegaConf

    plain = _plain(cfg)
    values = convert_section(plain, POPULATION_SCHEMAS[script], "")
    pop = values["population"]
    for key in ("seeds", "beta"):
        items = pop[key]
        if not items:
            raise ConfigError(f"population.{key}=[]: list at least one value.")
        if len(set(items)) != len(items):
            raise ConfigError(f"population.{key}={items}: a value is repeated; list each once.")
    if any(not (math.isfinite(b) and b >= 0) for b in pop["beta"]):
        raise ConfigError(f"population.beta={pop['beta']}: every beta must be a number >= 0.")
    if values["collector"]["backend"] != "single":
        raise ConfigError(
            f"collector.backend={values['collector']['backend']!r}: a population steps its "
            "agents' environments itself; use collector.backend=single."
        )
    if values["optim"]["weight_decay"]:
        raise ConfigError(
            f"optim.weight_decay={values['optim']['weight_decay']}: the population's one Adam "
            "over every group has no critic-only weight decay; use optim.weight_decay=0."
        )
    if values["algorithm"] != script.removesuffix("_population"):
        raise ConfigError(
            f"algorithm={values['algorithm']!r}: this population script trains "
            f"{script.removesuffix('_population')!r} agents."
        )
    out = OmegaConf.create(values)
    OmegaConf.set_struct(out, True)
    agent_configs(out)  # each agent's config passes the single script's checks
    return out


def agent_configs(cfg: Any) -> list[AgentSpec]:
    """The agents of ``population.beta x population.seeds`` (beta-major), each with its config.

    Agent ``(b, s)``'s config is the single run's: the population config without its
    ``population`` section, ``seed=s``, ``spqr.beta=b`` (``spqr.pairs``: ``population.pairs``
    unless null) and no progress bar (the population shows one). Its folder name is the
    single script's ``beta<b>_N<n>_seed<s>``.
    """
    plain = _plain(cfg)
    pop = plain.pop("population")
    agents = []
    for beta in pop["beta"]:
        for seed in pop["seeds"]:
            one = {**plain, "seed": int(seed), "resume": False}
            one["spqr"] = {**plain["spqr"], "beta": float(beta)}
            if pop.get("pairs"):
                one["spqr"]["pairs"] = pop["pairs"]
            one["logger"] = {**plain["logger"], "progress": False}
            name = f"beta{float(beta)}_N{plain['network']['ensemble_size']}_seed{int(seed)}"
            agents.append(AgentSpec(int(seed), float(beta), name, resolve_config(one, "online")))
    return agents


def _plain(cfg: Any) -> dict[str, Any]:
    """``cfg`` as plain dicts, without a ``hydra`` node (unresolvable outside a Hydra run)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg) and "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    plain = to_plain(cfg)
    if not isinstance(plain, dict):
        raise ConfigError(f"a config must be a mapping of fields, got {type(cfg).__name__}.")
    return {k: v for k, v in plain.items() if k != "hydra"}


def prepare_population_run(
    cfg: Any, run_dir: str | Path, script: str = "sac_ens_population"
) -> tuple[Any, Path, torch.device]:
    """Check the config (``POPULATION_SCHEMAS[script]``), create the run folder, set
    threads and the shared seed (``seed``)."""
    return open_run_folder(resolve_population_config(cfg, script), run_dir)


class AgentRun(RunContext):
    """One agent's :class:`~torchrl_spqr.training.common.RunContext` inside a population.

    Its rows, owed rows and TorchRL logger are a single run's; its counters and owed row
    are saved in the population's checkpoint (:meth:`state`, :meth:`restore`), so its own
    :meth:`checkpoint` writes nothing, and stop signals wait for the population's step
    (:meth:`PopulationRun.end_step`), not the agent's.
    """

    _owns_stops = False

    def checkpoint(self) -> None:
        """Nothing: :class:`PopulationRun` checkpoints every agent at once."""

    def state(self) -> dict[str, Any]:
        """The counters and the owed row (if any), for the population's checkpoint."""
        out: dict[str, Any] = {"counters": dict(self.counters)}
        if self.owed is not None:
            out["owed_row"] = {
                "row": {k: v for k, v in self.owed["row"].items() if isinstance(v, (int, float))},
                "eval": bool(self.owed["eval"]),
                "train": bool(self.owed.get("train", False)),
            }
        return out

    def restore(self, saved: dict[str, Any] | None) -> None:
        """Open the logs: resumed from ``saved`` (:meth:`state`'s), or fresh (``None``).

        Resumed: the counters are restored and ``metrics.csv`` and TorchRL's CSV scalar
        logs are cut back to the saved step (a row owed then is written first by
        ``__enter__``); fresh: they are emptied. As :meth:`RunContext.start`.
        """
        scalars = list((self.run_dir / "logs").rglob("scalars/*.csv"))
        if saved is not None:
            self.counters.update(saved["counters"])
            step = self.counters[self.step_field]
            last = self.metrics_csv.truncate(step)
            for p in scalars:
                truncate_csv(p, step, step_field=0, header=False)
            owed = saved.get("owed_row")
            self.owed = owed if owed and (last is None or last < step) else None
        else:
            self.metrics_csv.clear()
            for p in scalars:
                truncate_csv(p, -math.inf, step_field=0, header=False)
        self.logger = make_logger(self.cfg, self.run_dir)
        self._last_step = self.counters[self.step_field]
        self._started = True

    def start(self) -> bool:
        """Fresh logs (a population resumes its agents through :meth:`restore`)."""
        if not self._started:
            self.restore(None)
        return False

    def updated_for(self, loss_out: TensorDictBase, seconds: float) -> None:
        """Count one update that took ``seconds`` (the population's, shared by its agents)."""
        self._t_mark = time.perf_counter() - seconds
        self.updated(loss_out)

    def wants_training_row(self) -> bool:
        """Whether the row owed now takes the training metrics of the last update."""
        return bool(self.owed is not None and self.owed.get("train"))

    def add_to_last_output(self, extra: dict[str, torch.Tensor]) -> None:
        """Entries (e.g. SPQR's diagnostics) added to the last update's output for the row."""
        if self._last_out is not None:
            self._last_out = self._last_out.clone(False)
            for k, v in extra.items():
                self._last_out.set(k, v)


class _BufferView:
    """:class:`PopulationReplayBuffer` as :func:`save_checkpoint` reads a buffer.

    ``len``, the writer's ``state_dict()`` and ``storage[:n]``: the held transitions
    time-major, ``[n, K]`` (a memmap; the first dimension is the one a checkpoint counts).
    """

    def __init__(self, buffer: PopulationReplayBuffer) -> None:
        self.buffer = buffer
        self.writer = self
        self.storage = self

    def __len__(self) -> int:
        return len(self.buffer)

    def state_dict(self) -> dict[str, int]:
        st = self.buffer.state_dict()
        return {"_cursor": int(st["cursor"]), "size": int(st["size"])}

    def __getitem__(self, index: slice) -> TensorDictBase:
        data = self.buffer.state_dict()["data"][:, index]
        k, n = data.batch_size[:2]
        # on the CPU (a GPU population's buffers live on the GPU; a memmap is a CPU file)
        return data.apply(
            lambda t: t.transpose(0, 1).contiguous().cpu(), batch_size=[n, k], device="cpu"
        )


def _restore_shared(population: PopulationUpdate, saved: dict[str, Any], folder: Path) -> None:
    """Copy the shared loss entries of a checkpoint written before they were part of
    ``PopulationUpdate.state_dict()`` (its ``"shared"`` entry) back into the template."""
    mine = population.shared_state()
    for key, value in saved.items():
        if key not in mine or mine[key].shape != value.shape:
            raise ConfigError(
                f"resume=true: the checkpoint {folder} holds a shared loss entry {key!r} "
                "this population's loss lacks (or with another shape): it was saved by "
                "another loss or version of the code; start a new run in another folder."
            )
        with torch.no_grad():
            mine[key].copy_(value)


def _restore_buffer(buffer: PopulationReplayBuffer, data: TensorDictBase | None, meta) -> None:
    if not meta or not meta.get("len"):
        return
    n, cap = int(meta["len"]), buffer.capacity
    if n > cap:
        raise ConfigError(
            f"resume=true: the checkpoint's replay buffers hold {n} transitions per agent, "
            f"more than replay_buffer.size={cap}: resume with the size it was saved with."
        )
    k = data.batch_size[1]
    if k != buffer.num_agents:
        raise ConfigError(
            f"resume=true: the checkpoint holds {k} agents' buffers, this population has "
            f"{buffer.num_agents}: resume with the population it was saved with."
        )
    held = data.apply(lambda t: t.transpose(0, 1), batch_size=[k, n])
    device = buffer.device or held.device
    full = held[:, :1].expand(k, cap).clone().to(device)
    full[:, :n] = held.to(device)
    writer = meta.get("writer") or {}
    buffer.load_state_dict(
        {"data": full, "cursor": int(writer.get("_cursor", meta["cursor"])), "size": n}
    )


class PopulationRun:
    """The agents' runs, the batched update and the buffers: one checkpoint, resume, rows.

    The loop reports what happened, as with a single run's ``RunContext``::

        run = PopulationRun(cfg, run_dir, agents, agent_runs, population, buffer)
        if run.start():
            print("resumed at frame", run.frames)
        with run:  # rows owed by an interrupted run first; at every exit: a checkpoint
            while True:
                while run.updates < updates_due(run.frames):
                    run.updated(population(buffer.sample(batch_size)), seconds)
                run.end_step()  # each agent's row when due, the checkpoint when due
                if run.frames >= total_frames:
                    break
                ...  # one frame per agent: data is [K]
                buffer.extend(data.unsqueeze(1))
                run.collected(data)

    Args:
        cfg: the resolved population config (:func:`resolve_population_config`).
        run_dir: the population's folder; agent ``k`` writes ``run_dir / agents[k].name``.
        agents: the :class:`AgentSpec` list (:func:`agent_configs`).
        agent_runs: one :class:`AgentRun` per agent, in the same order.
        population: the :class:`PopulationUpdate` of the agents' losses.
        buffer: the agents' :class:`PopulationReplayBuffer`.
        losses: the agents' own loss modules (the ones the population was built from):
            :meth:`checkpoint` writes agent ``k``'s state into ``losses[k]`` and saves it
            in its folder as a single run's checkpoint (networks and config, no buffer).
    """

    def __init__(
        self,
        cfg: Any,
        run_dir: str | Path,
        agents: list[AgentSpec],
        agent_runs: list[AgentRun],
        population: PopulationUpdate,
        buffer: PopulationReplayBuffer,
        losses: list[Any],
    ) -> None:
        if not len(agents) == len(agent_runs) == population.num_agents == len(losses):
            raise ValueError(
                f"PopulationRun: {len(agents)} agents, {len(agent_runs)} runs, "
                f"{population.num_agents} in the population, {len(losses)} losses."
            )
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.agents, self.runs, self.population = agents, agent_runs, population
        self.buffer, self.losses = buffer, losses
        self.checkpoint_every = int(cfg.checkpoint.interval)
        self._pbar = None
        self._last_step = 0
        self._steps = steps_running()

    @property
    def frames(self) -> int:
        """Frames collected per agent (every agent collects one per step)."""
        return int(self.runs[0].counters["frames"])

    @property
    def updates(self) -> int:
        """Population updates done (each one update of every agent)."""
        return int(self.runs[0].counters["updates"])

    def start(self) -> bool:
        """Resume from ``<run_dir>/checkpoint`` (``resume=true`` and one there) or start fresh.

        Refuses (``ConfigError``) a checkpoint of another population (seeds, betas) or
        with different shape-determining settings (network, buffer size, environment).
        """
        resumed = False
        saved_agents: list[dict | None] = [None] * len(self.runs)
        if self.cfg.resume and has_checkpoint(self.run_dir):
            state, data, folder = load_checkpoint_data(self.run_dir, buffer=True)
            saved_cfg, now_cfg = state.get("config") or {}, to_plain(self.cfg)
            for key in ("seeds", "beta"):
                was = (saved_cfg.get("population") or {}).get(key)
                if was != now_cfg["population"][key]:
                    raise ConfigError(
                        f"resume=true: the checkpoint {folder} was saved by a population with "
                        f"population.{key}={was}, this run has {now_cfg['population'][key]}. "
                        "Resume with the saved value, or start a new run in another folder."
                    )
            check_resume_config(saved_cfg, now_cfg, folder)
            try:
                self.population.load_state_dict(state["population"])
                self.population.optimizer.load_state_dict(state["optim"])
            except (RuntimeError, KeyError, ValueError) as err:
                raise ConfigError(
                    f"resume=true: the checkpoint {folder} does not fit this population's "
                    f"networks ({str(err).strip().splitlines()[0]})."
                ) from err
            _restore_shared(self.population, state.get("shared") or {}, folder)
            _restore_buffer(self.buffer, data, state.get("buffer_meta"))
            saved_agents = [state["agents"][a.name] for a in self.agents]
            restore_rng(state["rng"])
            resumed = True
        for run, saved in zip(self.runs, saved_agents):
            run.restore(saved)
        if resumed:
            # the agents' folders, rewritten from the population's checkpoint: a kill
            # between it and them leaves them a checkpoint behind (and their history
            # copies missing)
            self._save_agents(state["rng"])
        self._last_step = self.frames
        if self.cfg.logger.progress:
            try:
                from tqdm import tqdm

                self._pbar = tqdm(
                    total=int(self.cfg.collector.total_frames),
                    initial=self.frames,
                    unit="frame",
                    dynamic_ncols=True,
                    mininterval=2.0,
                )
            except ImportError:  # pragma: no cover
                self._pbar = None
        return resumed

    def __enter__(self) -> PopulationRun:
        """Hold stop signals until a step ends, then write the rows an interrupted run owed
        (each agent's ``RunContext.__enter__``)."""
        self._steps.open()
        for i, run in enumerate(self.runs):
            try:
                run.__enter__()
            except BaseException:  # e.g. Ctrl-C during an owed evaluation: that run closed
                for other in self.runs[:i] + self.runs[i + 1 :]:
                    other.close()
                self._final_checkpoint()
                raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for run in self.runs:
            run.close()
        self._final_checkpoint()

    def _final_checkpoint(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.checkpoint()
        self._steps.close()

    # ------------------------------------------------------------ what the loop reports
    def collected(self, data: TensorDictBase) -> None:
        """Count one frame per agent (``data`` is ``[K]``: agent ``k``'s transition in row ``k``)."""
        for k, run in enumerate(self.runs):
            run.collected(data[k : k + 1])

    def updated(self, out: TensorDictBase, seconds: float) -> None:
        """Count one population update (``out``: its ``[K]`` output) that took ``seconds``."""
        for k, run in enumerate(self.runs):
            run.updated_for(out[k], seconds)

    def end_step(self, diagnostics=None) -> None:
        """Each agent's row when due (``diagnostics(k)`` adds entries to a training row), then
        the population checkpoint when due (or asked for: SIGTERM in a submitit job); then, if a stop signal arrived, raise
        :class:`~torchrl_spqr.training.stop.StopRequested` (every agent's step is complete)."""
        if diagnostics is not None:
            for k, run in enumerate(self.runs):
                if run.wants_training_row():
                    run.add_to_last_output(diagnostics(k))
        for run in self.runs:
            run.end_step()
        step = self.frames
        n, self._last_step = step - self._last_step, step
        asked = take_checkpoint_request()  # SIGTERM in a submitit job
        if asked or (n > 0 and step % self.checkpoint_every < n):
            self.checkpoint()
        if self._pbar is not None:
            self._pbar.update(n)
        check_stop()

    def summary(self) -> dict[str, dict[str, float]]:
        """Each agent's :meth:`RunContext.summary`, by run-folder name."""
        return {a.name: run.summary() for a, run in zip(self.agents, self.runs)}

    # ------------------------------------------------------------ checkpoints
    def checkpoint(self) -> None:
        """One checkpoint of the whole population, then each agent's networks in its folder.

        ``<run_dir>/checkpoint``: the stacked state, the optimiser, each agent's counters
        and owed row, the RNG states and the config; the replay buffers as a memmap. Then
        ``<run_dir>/<agent>/checkpoint``: the agent's loss state and single-run config,
        read by ``torchrl_spqr.training.restore.load_agent`` (and ``analysis --checkpoint``).
        """
        rng = capture_rng()
        state = {
            "population": self.population.state_dict(),
            "optim": self.population.optimizer.state_dict(),
            "agents": {a.name: run.state() for a, run in zip(self.agents, self.runs)},
            "rng": rng,
            "config": to_plain(self.cfg),
        }
        save_checkpoint(self.run_dir, state, _BufferView(self.buffer))
        self._save_agents(rng)

    def _save_agents(self, rng: dict[str, Any]) -> None:
        """Each agent's networks in ``<run_dir>/<agent>/checkpoint`` (and its history copy)."""
        for k, (agent, run) in enumerate(zip(self.agents, self.runs)):
            loss = self.population.write_agent(k, self.losses[k])
            one = {
                "loss": loss.state_dict(),
                "optim": {},
                "counters": dict(run.counters),
                "rng": rng,
                "config": to_plain(agent.cfg),
            }
            save_checkpoint(self.run_dir / agent.name, one)
            if self.cfg.checkpoint.get("history", False):
                save_history(self.run_dir / agent.name, one, run.counters["frames"])
