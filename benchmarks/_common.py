"""Hopper-sized builders shared by the benchmarks (obs 11, act 3)."""

from __future__ import annotations

import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal

OBS, ACT = 11, 3


def make_actor(hidden: int) -> ProbabilisticActor:
    net = nn.Sequential(
        MLP(in_features=OBS, out_features=2 * ACT, num_cells=[hidden, hidden]),
        NormalParamExtractor(),
    )
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=Bounded(-1.0, 1.0, (ACT,)),
        distribution_class=TanhNormal,
        return_log_prob=True,
    )


def make_batch(b: int) -> TensorDict:
    return TensorDict(
        {
            "observation": torch.randn(b, OBS),
            "action": torch.rand(b, ACT) * 1.98 - 0.99,
            "next": {
                "observation": torch.randn(b, OBS),
                "reward": torch.randn(b, 1),
                "done": torch.zeros(b, 1, dtype=torch.bool),
                "terminated": torch.zeros(b, 1, dtype=torch.bool),
            },
        },
        [b],
    )
