"""Loss modules: SPQR, the package's ensemble losses and the member-values protocol SPQR reads.

One loss per module, as in ``torchrl.objectives``: :mod:`~torchrl_spqr.objectives.spqr`
(``SPQRLoss``), :mod:`~torchrl_spqr.objectives.sac_n`, :mod:`~torchrl_spqr.objectives.redq`,
:mod:`~torchrl_spqr.objectives.edac`, :mod:`~torchrl_spqr.objectives.cql_n` (their shared
base in :mod:`~torchrl_spqr.objectives.common`), :mod:`~torchrl_spqr.objectives.cql` and
:mod:`~torchrl_spqr.objectives.torchrl_losses` (TorchRL's losses with ``N`` critics).
"""

from torchrl_spqr.objectives.cql import EnsembleCQLLoss
from torchrl_spqr.objectives.cql_n import CQLNLoss
from torchrl_spqr.objectives.edac import EDACLoss
from torchrl_spqr.objectives.member_values import (
    MemberValuesMixin,
    MemberValuesRequest,
    serves_member_values,
)
from torchrl_spqr.objectives.redq import MBPO_TARGET_ENTROPY, ReferenceREDQLoss, mbpo_target_entropy
from torchrl_spqr.objectives.sac_n import SACNLoss
from torchrl_spqr.objectives.spqr import SPQRLoss
from torchrl_spqr.objectives.torchrl_losses import (
    EnsembleREDQLoss,
    EnsembleSACLoss,
    EnsembleTD3Loss,
)

__all__ = [
    "MBPO_TARGET_ENTROPY",
    "CQLNLoss",
    "EDACLoss",
    "EnsembleCQLLoss",
    "EnsembleREDQLoss",
    "EnsembleSACLoss",
    "EnsembleTD3Loss",
    "MemberValuesMixin",
    "MemberValuesRequest",
    "ReferenceREDQLoss",
    "SACNLoss",
    "SPQRLoss",
    "mbpo_target_entropy",
    "serves_member_values",
]


def __getattr__(name: str):
    # ``REDQLoss`` was renamed ``ReferenceREDQLoss`` (it follows the REDQ reference
    # code, not TorchRL's ``REDQLoss``); the old name is kept for one release.
    if name == "REDQLoss":
        import warnings

        warnings.warn(
            "torchrl_spqr.objectives.REDQLoss is renamed ReferenceREDQLoss (the REDQ "
            "reference code's loss: summed squared error, policy delay, no alpha clamp); "
            "the old name will be removed in the next release. For TorchRL's semantics "
            "use torchrl.objectives.REDQLoss.",
            FutureWarning,
            stacklevel=2,
        )
        return ReferenceREDQLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
