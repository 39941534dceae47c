"""Helpers shared by the package's losses (like ``torchrl.objectives.utils``): keys, critics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import nn

from torchrl_spqr import functional as F
from torchrl_spqr.modules.ensemble import QEnsemble

__all__ = [
    "as_members",
    "host_count",
    "host_read",
    "key_str",
    "key_tuple",
    "next_key",
    "plain_key",
]


def host_read(module: nn.Module, name: str, cast: Callable[[Any], Any] = int) -> Any:
    """``cast(getattr(module, name))``: a 0-d buffer (a counter, SPQR's beta) on the host.

    A host read of a device value is not allowed while a CUDA graph is being
    captured (:func:`torchrl_spqr.functional.cuda_graph_capturing`); the value
    then comes from the module's host copy, which every eager read sets and
    :func:`host_count` keeps counting, so a schedule that branches on it is
    captured at the state it has reached (and replays as captured). Capturing
    before any eager read is an error (capture tools such as tensordict's
    ``CudaGraphModule`` run the module eagerly first).

    Examples:
        >>> import torch
        >>> m = torch.nn.Module()
        >>> m.register_buffer("count", torch.tensor(3))
        >>> host_read(m, "count")
        3
    """
    copies = module.__dict__.setdefault("_host_copies", {})
    if F.cuda_graph_capturing():
        if name not in copies:
            raise RuntimeError(
                f"{type(module).__name__}.{name} is read while a CUDA graph is being captured, "
                "before any eager call: run the module eagerly at least once before capturing "
                "(tensordict's CudaGraphModule does, with warmup >= 1)."
            )
        return copies[name]
    value = cast(getattr(module, name))
    copies[name] = value
    return value


def host_count(module: nn.Module, name: str, n: int = 1) -> None:
    """Add ``n`` to the counter buffer ``name`` (in place, on its device) and to the host
    copy :func:`host_read` keeps of it."""
    getattr(module, name).add_(n)
    copies = module.__dict__.get("_host_copies")
    if copies is not None and name in copies:
        copies[name] += n


def next_key(key: NestedKey) -> tuple[str, ...]:
    """The key of ``key``'s entry in the ``"next"`` sub-tensordict.

    Examples:
        >>> next_key("observation")
        ('next', 'observation')
        >>> next_key(("agents", "observation"))
        ('next', 'agents', 'observation')
    """
    return ("next", *key) if isinstance(key, tuple) else ("next", key)


def plain_key(key: NestedKey) -> NestedKey:
    """``key`` as ``TensorDictBase.keys(True)`` lists it: a one-element tuple becomes its string.

    Examples:
        >>> plain_key(("action",))
        'action'
        >>> plain_key(("next", "reward"))
        ('next', 'reward')
    """
    return key[0] if isinstance(key, tuple) and len(key) == 1 else key


def key_tuple(key: NestedKey) -> tuple[str, ...]:
    """``key`` as a tuple of strings.

    Examples:
        >>> key_tuple("action")
        ('action',)
    """
    return tuple(key) if isinstance(key, tuple) else (key,)


def key_str(key: NestedKey) -> str:
    """``key`` for an error message: nested entries joined with dots.

    Examples:
        >>> key_str(("next", "observation"))
        'next.observation'
    """
    return ".".join(key) if isinstance(key, tuple) else str(key)


def as_members(qvalue_network, num_qvalue_nets: int | None) -> list[TensorDictModuleBase]:
    """The critics of an ensemble loss as a list of independently built members.

    Accepts a :class:`~torchrl_spqr.modules.QEnsemble` or a list of modules with no
    shared parameter tensor; ``num_qvalue_nets``, when given, must match their number.
    """
    if isinstance(qvalue_network, QEnsemble):
        if num_qvalue_nets is not None and num_qvalue_nets != qvalue_network.num_members:
            raise ValueError(
                f"num_qvalue_nets={num_qvalue_nets} but the QEnsemble has "
                f"{qvalue_network.num_members} members."
            )
        return qvalue_network.members()
    if isinstance(qvalue_network, (list, tuple)):
        members = list(qvalue_network)
        if num_qvalue_nets is not None and num_qvalue_nets != len(members):
            raise ValueError(
                f"num_qvalue_nets={num_qvalue_nets} but {len(members)} critics were given."
            )
        ids = {id(p) for m in members for p in m.parameters()}
        if len(ids) != sum(1 for m in members for _ in m.parameters()):
            raise ValueError(
                "The critics share parameter tensors (e.g. [q] * N): pass independently "
                "built members (QEnsemble or [make_q() for _ in range(N)])."
            )
        return members
    raise TypeError(
        "qvalue_network must be a QEnsemble or a list of independently built critics; a single "
        "module would be expanded and resampled by TorchRL, which leaves constant tensors "
        "identical across members."
    )
