"""Stacking ``K`` agents' losses into one state, and the checks that they can be stacked.

Helpers of :class:`~torchrl_spqr.training.population.PopulationUpdate`: which
settings must be shared (they decide the vmapped call's control flow), which
tensors become per-agent rows, the optimiser's parameter groups, the target /
online pairs of the soft update, and per-agent normal draws under ``torch.vmap``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictParams
from tensordict.utils import NestedKey
from torch import Tensor, nn
from torchrl.objectives import LossModule

__all__ = [
    "GROUPS",
    "actor_of",
    "agent_beta",
    "check_same_structure",
    "check_shared_buffers",
    "check_shared_settings",
    "dotted_key",
    "group_of",
    "is_shared_key",
    "is_spqr",
    "per_agent_normal_draws",
    "prefix_of",
    "stack_state",
    "target_pairs",
    "wants_cudagraphs",
]

#: Loss attributes that decide the vmapped call's control flow: equal across agents.
_SHARED_SETTINGS = (
    "pairs",
    "member_weights",
    "add_to",
    "reduction",
    "fixed_alpha",
    "num_qvalue_nets",
    "deactivate_vmap",
    "diagnostics_interval",
    "sub_sample_len",
    "policy_update_delay",
)
#: Floating-point buffers read as Python numbers by the losses: equal across agents.
_SHARED_BUFFERS = ("gamma",)
#: Parameter groups of the optimiser, by the first matching path element.
GROUPS = {
    "critic": "qvalue_network_params",
    "actor": "actor_network_params",
    "alpha": "log_alpha",
}


def _randn(shape, dtype=None, device=None) -> Tensor:
    return torch.randn(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def per_agent_normal_draws(randomness: str) -> Iterator[None]:
    """Let ``torch.distributions.Normal.rsample`` draw per agent under ``vmap(randomness="different")``.

    ``Normal.rsample`` draws its noise in place into a fresh unbatched tensor
    (``torch.empty(shape).normal_()``), which ``torch.vmap`` refuses under
    ``randomness="different"`` (it could only repeat one draw). Within this
    context ``Normal`` draws with the out-of-place ``torch.randn(shape)``,
    which ``vmap`` batches into independent draws per agent; on CPU and CUDA
    ``randn`` is ``empty().normal_()``, so the numbers of an unbatched call are
    unchanged. ``"same"`` needs no change.
    """
    if randomness != "different":
        yield
        return
    module = torch.distributions.normal
    original = module._standard_normal
    module._standard_normal = _randn
    try:
        yield
    finally:
        module._standard_normal = original


def is_spqr(loss: LossModule) -> bool:
    return hasattr(loss, "current_beta") and isinstance(getattr(loss, "beta", None), Tensor)


def agent_beta(loss: LossModule, k: int) -> float:
    if getattr(loss, "_beta_fn", None) is not None:
        raise ValueError(
            f"Agent {k}'s SPQRLoss has a beta schedule; a population takes a constant beta "
            "per agent (set PopulationUpdate.beta between updates to schedule it)."
        )
    return float(loss.current_beta())


def check_shared_settings(losses: list[LossModule]) -> None:
    first = losses[0]
    for k, loss in enumerate(losses[1:], 1):
        if type(loss) is not type(first):
            raise ValueError(
                f"Agent {k}'s loss is a {type(loss).__name__}, agent 0's a "
                f"{type(first).__name__}: a population shares one loss class."
            )
    for obj_of in (lambda x: x, lambda x: getattr(x, "loss_module", None)):
        objs = [obj_of(loss) for loss in losses]
        if objs[0] is None:
            continue
        for k, obj in enumerate(objs[1:], 1):
            if type(obj) is not type(objs[0]):
                raise ValueError(
                    f"Agent {k} wraps a {type(obj).__name__}, agent 0 a "
                    f"{type(objs[0]).__name__}: a population shares one loss class."
                )
        for name in _SHARED_SETTINGS:
            values = [getattr(obj, name, None) for obj in objs]
            for k, v in enumerate(values[1:], 1):
                if v != values[0]:
                    raise ValueError(
                        f"{name}={v!r} for agent {k} but {values[0]!r} for agent 0: {name} "
                        "decides the control flow of the one batched call and must be the "
                        "same for every agent (run two populations instead)."
                    )
    if is_spqr(first):
        if getattr(first, "add_to", None) is not None:
            raise ValueError(
                "SPQRLoss(add_to=...) folds beta * KL into another entry, which a population "
                "cannot scale per agent; use add_to=None (the default)."
            )
        if getattr(first, "diagnostics_interval", 0) != 0:
            raise ValueError(
                "SPQRLoss diagnostics take data-dependent branches that torch.vmap cannot "
                "batch: build the agents with SPQRLoss(..., diagnostics_interval=0)."
            )


def check_same_structure(states: list[TensorDictBase]) -> None:
    ref = {k: v for k, v in states[0].items(True, True)}
    for k, state in enumerate(states[1:], 1):
        mine = {key: v for key, v in state.items(True, True)}
        if set(mine) != set(ref):
            diff = sorted(map(str, set(mine) ^ set(ref)))
            raise ValueError(
                f"Agent {k}'s loss has different parameters than agent 0's ({len(diff)} "
                f"entries differ, first: {diff[0]}): a population shares one architecture."
            )
        for key, value in mine.items():
            r = ref[key]
            if value.shape != r.shape or value.dtype != r.dtype or value.device != r.device:
                raise ValueError(
                    f"Agent {k}'s {dotted_key(key)} is {tuple(value.shape)} "
                    f"{value.dtype} on {value.device}, agent 0's {tuple(r.shape)} {r.dtype} on "
                    f"{r.device}: a population shares one architecture, dtype and device."
                )


def is_shared_key(key: NestedKey, value: Tensor, spqr: bool) -> bool:
    name = key[-1] if isinstance(key, tuple) else key
    if isinstance(value, nn.Parameter):
        return False
    if not value.is_floating_point() or name in _SHARED_BUFFERS:
        return True
    return spqr and key in ("beta", ("beta",))


def check_shared_buffers(states: list[TensorDictBase], shared: list[NestedKey]) -> None:
    for key in shared:
        name = key[-1] if isinstance(key, tuple) else key
        if name == "beta":
            continue
        ref = states[0].get(key)
        for k, state in enumerate(states[1:], 1):
            if not torch.equal(state.get(key), ref):
                raise ValueError(
                    f"{dotted_key(key)} differs "
                    f"between agent {k} and agent 0: it is read as a Python number inside the "
                    "loss, so it must be the same for every agent."
                )


def stack_state(states: list[TensorDictBase], first: TensorDictBase) -> TensorDictParams:
    # stacking keeps the nested batch sizes (e.g. the critics' [N] becomes [K, N])
    out = TensorDict.stack([s.detach() for s in states]).contiguous().clone()
    for key, value in list(out.items(True, True)):
        if isinstance(first.get(key), nn.Parameter):
            out.set(key, nn.Parameter(value))
    return TensorDictParams(out, no_convert=True)


def dotted_key(key: NestedKey) -> str:
    return ".".join(key) if isinstance(key, tuple) else str(key)


def group_of(key: NestedKey) -> str:
    parts = key if isinstance(key, tuple) else (key,)
    for group, marker in GROUPS.items():
        if marker in parts:
            return group
    return "other"


def target_pairs(state: TensorDictBase) -> tuple[list[NestedKey], list[NestedKey]]:
    targets, sources = [], []
    keys = set(state.keys(True, True))
    for key in keys:
        parts = key if isinstance(key, tuple) else (key,)
        for i, part in enumerate(parts):
            if part.startswith("target_") and part.endswith("_params"):
                src = (*parts[:i], part[len("target_") :], *parts[i + 1 :])
                if src not in keys:
                    raise ValueError(
                        f"Target entry {'.'.join(parts)} has no online counterpart "
                        f"{'.'.join(src)} in the population state."
                    )
                targets.append(key)
                sources.append(src)
                break
    if not targets:
        raise ValueError("The agents' losses have no target parameters to soft-update.")
    order = sorted(range(len(targets)), key=lambda i: targets[i])
    return [targets[i] for i in order], [sources[i] for i in order]


def prefix_of(state: TensorDictBase, marker: str) -> NestedKey:
    for key in state.keys(True, True):
        parts = key if isinstance(key, tuple) else (key,)
        if marker in parts:
            return parts[: parts.index(marker) + 1]
    raise ValueError(f"The agents' losses have no {marker!r}.")


def actor_of(loss: LossModule) -> nn.Module:
    base = getattr(loss, "loss_module", None) or loss
    actor = getattr(base, "actor_network", None)
    if actor is None:
        raise ValueError(f"{type(base).__name__} has no actor_network to act with.")
    return actor


def wants_cudagraphs(cudagraphs: bool | str, device: torch.device) -> bool:
    return bool(cudagraphs) and device.type == "cuda"
