"""Networks: the critic ensemble, the batched MLP that evaluates it, the multi-agent critic.

Like TorchRL's ``torchrl.modules``, this package (layer 1) holds modules only: no losses, data or
training loops. Objectives (:mod:`torchrl_spqr.objectives`) build on it.
"""

from torchrl_spqr.modules.ensemble import (
    INIT_SCHEMES,
    BatchedMLP,
    QEnsemble,
    init_linear_stack_,
    make_q_member,
)
from torchrl_spqr.modules.multiagent import MultiAgentQNet
from torchrl_spqr.modules.relu_mlp import ensemble_relu_mlp

__all__ = [
    "INIT_SCHEMES",
    "BatchedMLP",
    "QEnsemble",
    "init_linear_stack_",
    "make_q_member",
    "MultiAgentQNet",
    "ensemble_relu_mlp",
]
