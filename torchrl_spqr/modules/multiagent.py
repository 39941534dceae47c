"""The multi-agent critic member: ``Q(o, a)`` for a group of agents, as a plain ``nn.Module``.

Axes. A multi-agent batch has batch size ``[B]`` and per-agent entries of shape
``[B, n_agents, ...]``. An ensemble (:class:`~torchrl_spqr.modules.QEnsemble`)
of :class:`MultiAgentQNet` members gives Q-values ``[N, B, n_agents, 1]``:
dim 0 is the **ensemble**, the agent dim is a **batch** dim, so SPQR builds one
matrix per ``(sample, agent)`` and never mixes agents into the ensemble axis.

Why not TorchRL's ``MultiAgentMLP``: it keeps its parameters in a nested
``TensorDictParams`` that it swaps into a meta-device shell at every call; a
list of such members cannot be stacked and called functionally (SACLoss and
QEnsemble raise "Cannot unlock a tensordict that is part of a locked graph",
and ``QEnsemble.members()`` cannot materialise it). :class:`MultiAgentQNet` is
the same network (centralised or not, shared or per-agent parameters) with
plain parameters, so it stacks and vmaps like any critic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "GROUP", "MultiAgentQNet"]

#: ``network.activation`` choices of the multi-agent networks (the config check reads the names).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}

#: The agent group of VMAS environments in TorchRL.
GROUP = "agents"


class _AgentLinear(nn.Module):
    """``n_agents`` independent linear maps applied to ``[*batch, n_agents, in]``.

    Each agent's weights and biases are drawn as :class:`torch.nn.Linear` draws
    them (``U(-1/sqrt(in), 1/sqrt(in))``), independently per agent.
    """

    def __init__(self, n_agents: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.n_agents, self.in_features, self.out_features = n_agents, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_agents, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(n_agents, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every agent's weights and bias afresh, as ``nn.Linear.reset_parameters``."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            for a in range(self.n_agents):
                nn.init.kaiming_uniform_(self.weight[a], a=math.sqrt(5))
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ai,aoi->...ao", x, self.weight) + self.bias

    def extra_repr(self) -> str:
        return f"n_agents={self.n_agents}, in={self.in_features}, out={self.out_features}"


class MultiAgentQNet(nn.Module):
    """``Q(o, a)`` for a group of agents: ``[*batch, n_agents, d_i]`` inputs -> ``[*batch, n_agents, 1]``.

    The inputs (observation and action of every agent) are concatenated on the
    last dim. ``centralised=True`` (MASAC): each agent's value reads every
    agent's observation and action; ``False`` (ISAC): only its own.
    ``share_params=True``: one network for all agents; ``False``: one per agent
    (independently initialised). Same semantics as TorchRL's
    ``MultiAgentMLP(n_agent_outputs=1)``, with plain parameters so that an
    ensemble of it stacks and vmaps (see the module docstring).

    Args:
        n_agents: number of agents in the group (the size of the agent dim).
        n_agent_inputs: features per agent (observation + action sizes).

    Keyword Args:
        num_cells: hidden layer widths.
        activation_class: activation after each hidden layer.
        centralised: each agent's value reads all agents' inputs.
        share_params: one network for all agents (``False``: one per agent).

    Examples:
        >>> net = MultiAgentQNet(3, 18 + 2, num_cells=(32, 32), centralised=True, share_params=False)
        >>> net(torch.randn(7, 3, 18), torch.randn(7, 3, 2)).shape
        torch.Size([7, 3, 1])
    """

    def __init__(
        self,
        n_agents: int,
        n_agent_inputs: int,
        *,
        num_cells: Sequence[int] = (256, 256),
        activation_class: type[nn.Module] = nn.Tanh,
        centralised: bool = True,
        share_params: bool = True,
    ) -> None:
        super().__init__()
        self.n_agents = int(n_agents)
        self.centralised = bool(centralised)
        self.share_params = bool(share_params)
        prev = n_agent_inputs * (self.n_agents if self.centralised else 1)
        layers: list[nn.Module] = []
        for width in [*num_cells, 1]:
            layers.append(
                nn.Linear(prev, width)
                if self.share_params
                else _AgentLinear(self.n_agents, prev, width)
            )
            layers.append(activation_class())
            prev = width
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = torch.cat(inputs, -1) if len(inputs) > 1 else inputs[0]
        if x.shape[-2] != self.n_agents:
            raise ValueError(
                f"MultiAgentQNet expects inputs [*batch, n_agents={self.n_agents}, features], "
                f"got shape {tuple(x.shape)}."
            )
        if not self.centralised:
            return self.net(x)
        joint = x.flatten(-2)  # [*batch, n_agents * features]
        if self.share_params:
            # one joint value, read by every agent
            return self.net(joint).unsqueeze(-2).expand(*x.shape[:-1], 1)
        return self.net(joint.unsqueeze(-2).expand(*x.shape[:-1], joint.shape[-1]))
