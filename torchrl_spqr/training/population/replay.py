"""``K`` independent replay buffers in one storage (:class:`PopulationReplayBuffer`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tensordict import TensorDictBase

__all__ = ["PopulationReplayBuffer"]


class PopulationReplayBuffer:
    """``K`` independent uniform replay buffers in one ``[K, capacity]`` TensorDict storage.

    :meth:`extend` takes ``[K, T]`` transitions (agent ``k``'s in row ``k``, as
    a vectorised environment of ``K`` copies returns them, moved to the front);
    :meth:`sample` draws each agent's ``B`` indices independently and uniformly
    with replacement (as TorchRL's ``RandomSampler``) and returns a ``[K, B]``
    batch for :class:`PopulationUpdate`. The storage is allocated at the first
    :meth:`extend` from that data's keys, shapes and dtypes; the buffer is
    circular (the oldest transitions are overwritten once full).

    Args:
        num_agents: ``K``.
        capacity: transitions kept per agent.
        device: where the storage lives (default: the first data's device).
        generator: an optional ``torch.Generator`` for the index draws.
    """

    def __init__(
        self,
        num_agents: int,
        capacity: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if int(num_agents) < 1 or int(capacity) < 1:
            raise ValueError(
                f"num_agents and capacity must be >= 1, got {num_agents} and {capacity}."
            )
        self.num_agents, self.capacity = int(num_agents), int(capacity)
        self.device = None if device is None else torch.device(device)
        self.generator = generator
        self._data: TensorDictBase | None = None
        self._cursor = 0
        self._size = 0

    def __len__(self) -> int:
        """Transitions held per agent."""
        return self._size

    def extend(self, data: TensorDictBase) -> None:
        """Append ``[K, T]`` transitions (agent ``k``'s in row ``k``)."""
        if not isinstance(data, TensorDictBase) or data.batch_dims != 2:
            raise ValueError(
                "extend expects a TensorDict with batch size [K, T], got "
                f"{getattr(data, 'batch_size', type(data).__name__)}."
            )
        if data.batch_size[0] != self.num_agents:
            raise ValueError(
                f"extend expects K={self.num_agents} rows (one per agent), got "
                f"{data.batch_size[0]}."
            )
        if self.device is not None:
            data = data.to(self.device)
        if self._data is None:
            self._data = data[:, :1].expand(self.num_agents, self.capacity).clone()
        t = data.batch_size[1]
        if t > self.capacity:
            data, t = data[:, -self.capacity :], self.capacity
        idx = (torch.arange(t, device=self._data.device) + self._cursor) % self.capacity
        self._data[:, idx] = data
        self._cursor = (self._cursor + t) % self.capacity
        self._size = min(self._size + t, self.capacity)

    def sample(self, batch_size: int) -> TensorDictBase:
        """A ``[K, batch_size]`` batch, each agent's rows drawn from its own buffer."""
        if self._size == 0 or self._data is None:
            raise RuntimeError(
                "PopulationReplayBuffer.sample: the buffer is empty; extend it first."
            )
        device = self._data.device
        idx = torch.randint(
            self._size, (self.num_agents, int(batch_size)), device=device, generator=self.generator
        )
        rows = torch.arange(self.num_agents, device=device).unsqueeze(-1)
        return self._data[rows, idx]

    def state_dict(self) -> dict[str, object]:
        """Storage and cursor, for checkpoints (``load_state_dict`` restores them)."""
        return {"data": self._data, "cursor": self._cursor, "size": self._size}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore what :meth:`state_dict` returned."""
        data = state["data"]
        if data is not None and tuple(data.batch_size) != (self.num_agents, self.capacity):
            raise ValueError(
                f"The saved storage has batch size {list(data.batch_size)}, expected "
                f"[{self.num_agents}, {self.capacity}]."
            )
        self._data = data
        self._cursor, self._size = int(state["cursor"]), int(state["size"])
