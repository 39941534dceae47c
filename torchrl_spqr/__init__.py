"""torchrl_spqr: SPQR regularisation of Q-ensembles for TorchRL.

SPQR (Lee, Han, Cho, Lee, NeurIPS 2023, arXiv 2401.03137) pushes the critics of
an ensemble towards independence by comparing the spectrum of small symmetric
random matrices built from their Q-values with Wigner's semicircle law.
"""

from torchrl_spqr import diagnostics, functional
from torchrl_spqr.functional import spqr_kl
from torchrl_spqr.modules import QEnsemble, make_q_member
from torchrl_spqr.objectives import (
    CQLNLoss,
    EDACLoss,
    ReferenceREDQLoss,
    SACNLoss,
    SPQRLoss,
    mbpo_target_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "CQLNLoss",
    "EDACLoss",
    "QEnsemble",
    "ReferenceREDQLoss",
    "SACNLoss",
    "SPQRLoss",
    "mbpo_target_entropy",
    "diagnostics",
    "functional",
    "make_q_member",
    "spqr_kl",
    "__version__",
]


def __getattr__(name: str):
    # ``REDQLoss`` was renamed ``ReferenceREDQLoss``; the old name is kept for one release.
    if name == "REDQLoss":
        import warnings

        warnings.warn(
            "torchrl_spqr.REDQLoss is renamed ReferenceREDQLoss (the REDQ reference code's "
            "loss: summed squared error, policy delay, no alpha clamp); the old name will be "
            "removed in the next release. For TorchRL's semantics use "
            "torchrl.objectives.REDQLoss.",
            FutureWarning,
            stacklevel=2,
        )
        return ReferenceREDQLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
