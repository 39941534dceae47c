"""The batched update of ``K`` agents (:class:`PopulationUpdate`) and :func:`build_population`.

See :mod:`torchrl_spqr.training.population` for what is per agent, what is
shared, and why the result equals ``K`` separate runs.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn
from torchrl.objectives import LossModule

from torchrl_spqr.training.population.stacking import (
    GROUPS,
    actor_of,
    agent_beta,
    check_same_structure,
    check_shared_buffers,
    check_shared_settings,
    dotted_key,
    group_of,
    is_shared_key,
    is_spqr,
    per_agent_normal_draws,
    prefix_of,
    stack_state,
    target_pairs,
    wants_cudagraphs,
)

__all__ = ["PopulationUpdate", "build_population"]


def build_population(
    make_loss: Callable[[int], LossModule], seeds: Sequence[int], **kwargs
) -> PopulationUpdate:
    """Build one agent per seed (``torch.manual_seed(seed); make_loss(seed)``) and stack them.

    ``make_loss(seed)`` builds one agent's loss exactly as a single run would
    (actor, critic ensemble, ``SACNLoss``, optionally ``SPQRLoss(beta=...)``);
    ``kwargs`` go to :class:`PopulationUpdate`. The global RNG is left in the
    state the last agent's construction left it.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("build_population needs at least one seed.")
    losses = []
    for seed in seeds:
        torch.manual_seed(seed)
        losses.append(make_loss(seed))
    return PopulationUpdate(losses, **kwargs)


class PopulationUpdate(nn.Module):
    """``K`` independent agents' losses, optimisers and target updates in one batched call.

    Args:
        losses: ``K >= 1`` loss modules built the same way (same classes,
            architecture and Python-level settings; different parameters,
            temperatures, target entropies and SPQR betas are fine). They are
            not modified: their state is copied into the stacked
            :attr:`state` (a copy of agent 0's loss serves as the template the
            state is swapped into); :meth:`write_agent` copies an agent back.

    Keyword Args:
        lr: Adam learning rate, a float for every group or a mapping with the
            keys ``"critic"``, ``"actor"``, ``"alpha"`` (missing keys: 3e-4).
            Shared by the agents.
        tau: soft target update rate (TorchRL's ``SoftUpdate(tau=...)``), shared.
        randomness: ``"different"`` (default: each agent draws its own policy
            samples) or ``"same"`` (every agent sees the draw a single run would
            see; for checking against single runs).
        max_grad_norm: if given, each agent's gradient of each group (critic,
            actor, alpha) is clipped to this norm on its own, as
            ``torch.nn.utils.clip_grad_norm_`` on that agent's parameters would.
        optimizer_kwargs: further ``torch.optim.Adam`` arguments (``eps``,
            ``betas``, ``weight_decay``, ``amsgrad``, ``fused``, ``foreach``).
            Defaults to the fused kernel (``fused=True``).
        compile: ``False`` (default), ``True`` or a ``torch.compile`` mode
            string: compile the update; :meth:`act` is then compiled too
            (default mode: one graph for the K policies, without the Python
            overhead of the vmapped eager call, which dominates on a GPU; its
            random draws come from the compiled kernels' generator, so they
            differ from the eager draws, as a compiled update's do).
        cudagraphs: ``False`` (default), ``True`` (CUDA only; refused
            elsewhere) or ``"auto"`` (capture on CUDA, eager with a warning
            elsewhere): capture the update with
            :class:`tensordict.nn.CudaGraphModule`.

    Calling the module with a ``[K, B]`` batch (agent ``k``'s batch in row
    ``k``) runs one full update (loss, backward, per-agent clipping, Adam
    step, soft target update) and returns the detached ``[K]`` outputs
    (``loss_*`` entries, ``alpha``, ``entropy``, ...; ``loss_spqr`` already
    multiplied by each agent's beta). :meth:`loss` returns the same entries
    with their graphs, for custom loops.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import NormalParamExtractor, TensorDictModule
        >>> from torchrl.data import Bounded
        >>> from torchrl.modules import ProbabilisticActor, TanhNormal
        >>> from torchrl_spqr import QEnsemble, SACNLoss, SPQRLoss, make_q_member
        >>> def make_loss(seed, beta):
        ...     actor = ProbabilisticActor(
        ...         TensorDictModule(nn.Sequential(nn.Linear(4, 4), NormalParamExtractor()),
        ...                          in_keys=["observation"], out_keys=["loc", "scale"]),
        ...         in_keys=["loc", "scale"], distribution_class=TanhNormal,
        ...         spec=Bounded(-1.0, 1.0, (2,)), return_log_prob=True)
        ...     critics = QEnsemble(lambda: make_q_member(6, num_cells=(16,)), 5)
        ...     return SPQRLoss(SACNLoss(actor, critics), beta=beta, diagnostics_interval=0)
        >>> pop = PopulationUpdate([make_loss(0, 0.0), make_loss(1, 1.0)])
        >>> batch = TensorDict({"observation": torch.randn(2, 8, 4),
        ...     "action": torch.rand(2, 8, 2) * 2 - 1,
        ...     "next": {"observation": torch.randn(2, 8, 4), "reward": torch.randn(2, 8, 1),
        ...              "done": torch.zeros(2, 8, 1, dtype=torch.bool),
        ...              "terminated": torch.zeros(2, 8, 1, dtype=torch.bool)}}, [2, 8])
        >>> out = pop(batch)
        >>> out["loss_qvalue"].shape, pop.beta.tolist()
        (torch.Size([2]), [0.0, 1.0])
    """

    def __init__(
        self,
        losses: Sequence[LossModule],
        *,
        lr: float | Mapping[str, float] = 3e-4,
        tau: float = 0.005,
        randomness: str = "different",
        max_grad_norm: float | None = None,
        optimizer_kwargs: Mapping[str, object] | None = None,
        compile: bool | str = False,
        cudagraphs: bool | str = False,
    ) -> None:
        super().__init__()
        losses = list(losses)
        if not losses:
            raise ValueError("PopulationUpdate needs at least one agent's loss, got none.")
        if not all(isinstance(loss, LossModule) for loss in losses):
            bad = sorted(
                {type(loss).__name__ for loss in losses if not isinstance(loss, LossModule)}
            )
            raise TypeError(f"PopulationUpdate takes TorchRL LossModules, got {bad}.")
        if randomness not in ("different", "same"):
            raise ValueError(f"randomness must be 'different' or 'same', got {randomness!r}.")
        if not 0.0 < float(tau) <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau}.")
        if max_grad_norm is not None and not float(max_grad_norm) > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}.")
        check_shared_settings(losses)
        self.num_agents = len(losses)
        self.randomness = randomness
        self.tau = float(tau)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)

        template = copy.deepcopy(losses[0])
        self._spqr = is_spqr(template)
        betas = [agent_beta(loss, k) for k, loss in enumerate(losses)] if self._spqr else []
        # the template computes beta=1 * KL for everyone; each agent's beta scales it outside
        self.__dict__["_template"] = template  # not a submodule: its tensors are swapped in
        states = [TensorDict.from_module(loss) for loss in losses]
        check_same_structure(states)
        shared = [k for k, v in states[0].items(True, True) if is_shared_key(k, v, self._spqr)]
        check_shared_buffers(states, shared)
        self._shared_keys = shared
        self.state = stack_state([s.exclude(*shared) for s in states], states[0])
        self.register_buffer(
            "beta",
            torch.tensor(betas if betas else [0.0] * self.num_agents, device=self.device),
        )
        # built outside vmap (its lazy construction reads Python floats)
        _ = template.value_estimator
        if self._spqr:
            # always computed (beta = 0 agents multiply it by 0), so that beta can be
            # changed between updates or loaded from a checkpoint
            template.beta.fill_(1.0)
        targets, sources = target_pairs(self.state)
        # the stacked tensors are updated in place: the lists are built once
        self._targets = [self.state.get(k) for k in targets]
        self._sources = [self.state.get(k) for k in sources]
        self._actor_prefix = prefix_of(self.state, "actor_network_params")
        self.optimizer = self._make_optimizer(lr, dict(optimizer_kwargs or {}), cudagraphs)
        self._update = self._build_update(compile, cudagraphs)
        self._act = torch.compile(self._act_eager) if compile else self._act_eager
        # the template's shared entries (not submodule state) travel in state_dict()
        self.register_state_dict_post_hook(_save_shared_state)
        self.register_load_state_dict_pre_hook(_load_shared_state)

    # ------------------------------------------------------------ building
    def _make_optimizer(
        self, lr: float | Mapping[str, float], kwargs: dict, cudagraphs: bool | str
    ) -> torch.optim.Optimizer:
        rates = {g: 3e-4 for g in GROUPS}
        if isinstance(lr, Mapping):
            unknown = set(lr) - set(GROUPS)
            if unknown:
                raise ValueError(
                    f"lr keys must be among {sorted(GROUPS)}, got unknown {sorted(unknown)}."
                )
            rates.update({k: float(v) for k, v in lr.items()})
        else:
            rates = {g: float(lr) for g in GROUPS}
        groups: dict[str, list[Tensor]] = {g: [] for g in (*GROUPS, "other")}
        for key, value in self.state.items(True, True):
            if isinstance(value, nn.Parameter):
                groups[group_of(key)].append(value)
        if groups["other"]:
            raise ValueError(
                "PopulationUpdate found trainable parameters outside the critic, actor and "
                f"temperature ({len(groups['other'])} tensors); losses with other trainable "
                "parts are not supported."
            )
        self._groups = {g: ps for g, ps in groups.items() if ps and g != "other"}
        device = self.device
        if "fused" not in kwargs and "foreach" not in kwargs:
            kwargs["fused"] = True
        if wants_cudagraphs(cudagraphs, device):
            kwargs["capturable"] = True
        return torch.optim.Adam(
            [{"params": ps, "lr": rates[g], "name": g} for g, ps in self._groups.items()], **kwargs
        )

    def _build_update(self, compile: bool | str, cudagraphs: bool | str) -> Callable:
        update = self._update_eager
        device = self.device
        if compile:
            mode = compile if isinstance(compile, str) else None
            update = torch.compile(update, mode=mode)
        if cudagraphs not in (False, True, "auto"):
            raise ValueError(f"cudagraphs must be True, False or 'auto', got {cudagraphs!r}.")
        if cudagraphs is True and device.type != "cuda":
            raise ValueError(
                f"cudagraphs=True needs a CUDA device, but the population lives on {device}: "
                "CUDA graphs capture CUDA kernels only. Use cudagraphs=False (or 'auto') on "
                "CPU; compile=True works on CPU."
            )
        if cudagraphs == "auto" and device.type != "cuda":
            warnings.warn(
                f"cudagraphs='auto': the population lives on {device}, not CUDA; the update "
                "runs without CUDA graphs.",
                UserWarning,
                stacklevel=3,
            )
        if wants_cudagraphs(cudagraphs, device):
            from tensordict.nn import CudaGraphModule

            update = CudaGraphModule(update, in_keys=[], out_keys=[], warmup=5)
        return update

    # ------------------------------------------------------------ the update
    @property
    def device(self) -> torch.device:
        """The device of the agents' stacked parameters (where the losses were built)."""
        return next(iter(self.state.values(True, True))).device

    @property
    def template(self) -> LossModule:
        """The module the stacked state is swapped into (a copy of agent 0's loss)."""
        return self.__dict__["_template"]

    def shared_state(self) -> dict[str, Tensor]:
        """The loss entries every agent shares (not stacked), by dotted name.

        Counters such as REDQ's ``update_count`` (its policy-update schedule),
        held by :attr:`template`. They are part of :meth:`state_dict` (as
        ``shared_state.<name>``) and restored by :meth:`load_state_dict`; a
        state dict saved without them (by an older version) still loads and
        leaves them as they are.
        """
        stacked = {dotted_key(k) for k in self.state.keys(True, True)}
        out = {}
        for key, value in TensorDict.from_module(self.template).items(True, True):
            name = dotted_key(key)
            if name not in stacked:
                out[name] = value
        return out

    def _agent_loss(self, state: TensorDictBase, batch: TensorDictBase) -> TensorDictBase:
        with state.to_module(self.template):
            out = self.template(batch)
        return out.select(*[k for k, v in out.items() if v.shape == torch.Size([])])

    def loss(self, batch: TensorDictBase) -> TensorDictBase:
        """The ``[K]`` loss outputs of ``batch`` (``[K, B]``), with their graphs.

        ``loss_spqr`` is multiplied by each agent's :attr:`beta` (so a
        ``beta = 0`` agent's entry is a zero with exactly zero gradient).
        """
        self._check_batch(batch)
        try:
            with per_agent_normal_draws(self.randomness):
                out = torch.vmap(self._agent_loss, (0, 0), randomness=self.randomness)(
                    self.state, batch
                )
        except RuntimeError as err:
            if "functorch" not in str(err) and "vmap" not in str(err):
                raise
            name = type(getattr(self.template, "loss_module", None) or self.template).__name__
            raise RuntimeError(
                f"{name} cannot run under torch.vmap, so PopulationUpdate cannot batch it "
                f"(supported: SACNLoss, ReferenceREDQLoss, CQLNLoss, alone or in SPQRLoss): {err}"
            ) from err
        if self._spqr and "loss_spqr" in out.keys():
            out.set("loss_spqr", out.get("loss_spqr") * self.beta)
            if "spqr_beta" in out.keys():
                out.set("spqr_beta", self.beta.clone())
        return out

    def _update_eager(self, batch: TensorDictBase) -> TensorDictBase:
        out = self.loss(batch)
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
        total.sum().backward()
        if self.max_grad_norm is not None:
            self._clip_per_agent()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self._targets, self._sources, self.tau)
        return out.detach()

    def forward(self, batch: TensorDictBase) -> TensorDictBase:
        """One update of every agent on its row of ``batch`` (``[K, B]``); detached ``[K]`` outputs."""
        return self._update(batch)

    @torch.no_grad()
    def _clip_per_agent(self) -> None:
        for params in self._groups.values():
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            sq = torch.stack([g.pow(2).reshape(g.shape[0], -1).sum(1) for g in grads]).sum(0)
            coef = (self.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.reshape(-1, *([1] * (g.dim() - 1))))

    def _check_batch(self, batch: TensorDictBase) -> None:
        if not isinstance(batch, TensorDictBase):
            raise TypeError(f"The batch must be a TensorDict, got {type(batch).__name__}.")
        if batch.batch_dims < 2 or batch.batch_size[0] != self.num_agents:
            raise ValueError(
                f"The batch must have batch size [K={self.num_agents}, B, ...] (agent k's "
                f"batch in row k), got {list(batch.batch_size)}."
            )

    # ------------------------------------------------------------ agents
    def act(self, observation: TensorDictBase) -> TensorDictBase:
        """Run every agent's policy on its row of ``observation`` (``[K, ...]``), vmapped.

        Uses the current exploration type (wrap in TorchRL's
        ``set_exploration_type`` for deterministic evaluation); returns the
        policy's output tensordict ``[K, ...]``.
        """
        if observation.batch_size[:1] != torch.Size([self.num_agents]):
            raise ValueError(
                f"act expects a [K={self.num_agents}, ...] tensordict, got "
                f"{list(observation.batch_size)}."
            )
        return self._act(observation)

    def _act_eager(self, observation: TensorDictBase) -> TensorDictBase:
        actor = actor_of(self.template)
        params = self.state.get(self._actor_prefix)

        def one(p: TensorDictBase, td: TensorDictBase) -> TensorDictBase:
            with p.to_module(actor):
                return actor(td)

        with torch.no_grad(), per_agent_normal_draws(self.randomness):
            return torch.vmap(one, (0, 0), randomness=self.randomness)(params, observation)

    @torch.no_grad()
    def write_agent(self, k: int, loss: LossModule) -> LossModule:
        """Copy agent ``k``'s parameters and buffers into ``loss`` (built like the agents).

        For evaluation, checkpoints and run folders of one agent with the
        single-run tools. The SPQR ``beta`` buffer receives the agent's beta.
        """
        if not 0 <= k < self.num_agents:
            raise IndexError(f"agent index {k} out of range for a population of {self.num_agents}.")
        dest = TensorDict.from_module(loss)
        mine = self.state[k]
        missing = [key for key in mine.keys(True, True) if key not in dest.keys(True, True)]
        if missing:
            raise ValueError(
                f"write_agent: the loss lacks {len(missing)} of the population's entries "
                f"(first: {missing[0]!r}); build it like the agents."
            )
        for key, value in mine.items(True, True):
            target = dest.get(key)
            if target.shape != value.shape:
                raise ValueError(
                    f"write_agent: {key!r} has shape {tuple(target.shape)} in the loss but "
                    f"{tuple(value.shape)} in the population."
                )
            target.copy_(value)
        if self._spqr:
            loss.beta.fill_(float(self.beta[k]))
        return loss

    def adam_state(self, k: int) -> dict[str, dict[str, Tensor]]:
        """Agent ``k``'s Adam state: ``{name: {"exp_avg": ..., "exp_avg_sq": ..., "step": ...}}``."""
        out = {}
        for key, value in self.state.items(True, True):
            if isinstance(value, nn.Parameter) and value in self.optimizer.state:
                st = self.optimizer.state[value]
                out[dotted_key(key)] = {
                    name: (t[k] if t.dim() > 0 else t) for name, t in st.items()
                }
        return out


_SHARED_PREFIX = "shared_state."


def _save_shared_state(module: PopulationUpdate, state_dict, prefix: str, local_metadata) -> None:
    for name, value in module.shared_state().items():
        state_dict[prefix + _SHARED_PREFIX + name] = value.detach().clone()


def _load_shared_state(
    module: PopulationUpdate,
    state_dict,
    prefix: str,
    local_metadata,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    mine = module.shared_state()
    start = prefix + _SHARED_PREFIX
    for key in [k for k in state_dict if k.startswith(start)]:
        name = key[len(start) :]
        target = mine.get(name)
        if target is None:
            continue  # left in the dict: load_state_dict reports it as unexpected
        value = state_dict.pop(key)
        if tuple(value.shape) != tuple(target.shape):
            error_msgs.append(
                f"size mismatch for {key}: copying a tensor of shape {tuple(value.shape)}, "
                f"the shared entry {name!r} has shape {tuple(target.shape)}."
            )
            continue
        with torch.no_grad():
            target.copy_(value)
