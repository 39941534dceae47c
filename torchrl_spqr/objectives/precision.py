"""``critic_matmul_dtype``: the precision of an ensemble loss's critic products.

A mixin of :class:`~torchrl_spqr.objectives.common.EnsembleLossBase`, split from
it: the loss keeps its batched critic caller in ``self._batched_q`` (a
:class:`~torchrl_spqr.modules.BatchedMLP`, or ``None`` when the members run one by
one) and calls :meth:`_keep_critic_precision` after rebuilding it.
"""

from __future__ import annotations

import torch

from torchrl_spqr.modules.relu_mlp import MATMUL_DTYPES

__all__ = ["CriticPrecisionMixin"]


class CriticPrecisionMixin:
    """Adds the ``critic_matmul_dtype`` property (see its docstring)."""

    @property
    def critic_matmul_dtype(self) -> torch.dtype | None:
        """The dtype of the critics' products below their last layer (``None``: full precision).

        ``torch.bfloat16`` (or ``torch.float16``) runs the hidden layers' products of
        plain ReLU critics (``Linear (-> ReLU -> Linear)*``, the default
        :func:`~torchrl_spqr.modules.ensemble.make_q_member`) in that dtype, with
        the activations kept in it; the last layer, hence the Q-values and TD
        targets, the parameters and their gradients stay in full precision
        (:func:`~torchrl_spqr.modules.relu_mlp.ensemble_relu_mlp`). On CPUs with
        AMX or AVX512-BF16 the bfloat16 products are several times faster than
        float32 ones (``benchmarks/README.md``); elsewhere they can be slower.
        Critics of another structure (LayerNorm, dropout, other activations) or
        ``deactivate_vmap=True`` refuse it. Not saved in the ``state_dict``. Left
        unset, it reads :attr:`BatchedMLP.matmul_dtype <torchrl_spqr.modules.BatchedMLP.matmul_dtype>`
        (``None`` unless set on the class).

        Examples:
            >>> import torch
            >>> from torchrl_spqr import QEnsemble, SACNLoss, make_q_member
            >>> from torchrl_spqr.training.builders import make_actor  # doctest: +SKIP
            >>> loss = SACNLoss(actor, QEnsemble(lambda: make_q_member(14), 10))  # doctest: +SKIP
            >>> loss.critic_matmul_dtype = torch.bfloat16  # doctest: +SKIP
        """
        bq = self._batched_q
        return bq.matmul_dtype if bq is not None else self.__dict__.get("_critic_matmul_dtype")

    @critic_matmul_dtype.setter
    def critic_matmul_dtype(self, value: torch.dtype | None) -> None:
        if value is not None:
            if value not in MATMUL_DTYPES:
                raise ValueError(
                    f"critic_matmul_dtype must be torch.bfloat16, torch.float16 or None, "
                    f"got {value!r}."
                )
            bq = self._batched_q
            if bq is None or not bq.fusable:
                why = (
                    "deactivate_vmap=True or vmap_randomness='same' evaluates the members "
                    "one by one"
                    if bq is None
                    else "its members are not Linear (-> ReLU -> Linear)* with biases"
                )
                raise ValueError(
                    f"critic_matmul_dtype={value} needs plain ReLU critics evaluated as one "
                    f"batched ensemble, but {why}."
                )
        self.__dict__["_critic_matmul_dtype"] = value
        if self._batched_q is not None:
            self._batched_q.matmul_dtype = value

    def _keep_critic_precision(self) -> None:
        """After ``self._batched_q`` was rebuilt: the chosen precision again (unset: the
        class default of :class:`~torchrl_spqr.modules.BatchedMLP`)."""
        if self._batched_q is not None and "_critic_matmul_dtype" in self.__dict__:
            self._batched_q.matmul_dtype = self.__dict__["_critic_matmul_dtype"]
