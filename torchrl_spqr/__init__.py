"""torchrl_spqr: SPQR regularisation of Q-ensembles for TorchRL.

SPQR (Lee, Han, Cho, Lee, NeurIPS 2023, arXiv 2401.03137) pushes the critics of
an ensemble towards independence by comparing the spectrum of small symmetric
random matrices built from their Q-values with Wigner's semicircle law.
"""

from torchrl_spqr import diagnostics, functional
from torchrl_spqr.ensemble import QEnsemble, make_q_member
from torchrl_spqr.functional import spqr_kl
from torchrl_spqr.loss import SPQRLoss
from torchrl_spqr.objectives import CQLNLoss, EDACLoss, REDQLoss, SACNLoss, mbpo_target_entropy

__version__ = "0.1.0"

__all__ = [
    "CQLNLoss",
    "EDACLoss",
    "QEnsemble",
    "REDQLoss",
    "SACNLoss",
    "SPQRLoss",
    "mbpo_target_entropy",
    "diagnostics",
    "functional",
    "make_q_member",
    "spqr_kl",
    "__version__",
]
