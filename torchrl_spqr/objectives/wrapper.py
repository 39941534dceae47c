"""``LossWrapper``: a TorchRL loss module that stands where the loss it wraps stood.

A wrapper (:class:`~torchrl_spqr.objectives.SPQRLoss` is one) holds the wrapped loss as
``self.loss_module`` and adds its own terms. Code written for the wrapped loss keeps
working on the wrapper:

- attributes the wrapper does not define itself (``qvalue_network_params``,
  ``target_entropy``, ``num_qvalue_nets``, ...) are the wrapped loss's;
- ``tensor_keys`` / ``set_keys``, ``value_estimator`` / ``make_value_estimator`` and
  ``set_vmap_randomness`` are the wrapped loss's;
- :class:`~torchrl.objectives.SoftUpdate` given the wrapper finds and updates the
  wrapped loss's target parameters;
- a bare state dict of the wrapped loss's class loads into the wrapper, and the
  wrapped loss's lazily registered buffers are in the wrapper's state dict;
- ``.to(device)`` / ``.double()`` leave no stale cached copy of the parameters.

With ``loss_module=None`` (a standalone loss) these fall back to
:class:`~torchrl.objectives.LossModule`'s behaviour.
"""

from __future__ import annotations

import contextlib
from typing import Any

from tensordict.nn import TensorDictParams
from torchrl.objectives import LossModule

__all__ = ["LossWrapper"]


class LossWrapper(LossModule):
    """Base of loss modules that wrap another one (``self.loss_module``) and stand in its place.

    Subclasses call :meth:`_wrap` in their constructor (or set ``self.loss_module = None``
    for a standalone loss), and rebuild their own vmapped calls in :meth:`_make_vmap`
    (called when the vmap randomness changes).
    """

    def _wrap(self, loss_module: LossModule) -> None:
        """Registers ``loss_module`` as the wrapped loss (``self.loss_module``).

        The wrapper shares the wrapped loss's registry of target updaters, so that
        ``SoftUpdate(wrapper)`` marks the wrapped loss as having one.
        """
        self.loss_module = loss_module
        self._has_update_associated = loss_module._has_update_associated

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            values = d.get(store)
            if values is not None and name in values:
                return values[name]
        base = d.get("_modules", {}).get("loss_module")
        if base is not None and not (name.startswith("__") and name.endswith("__")):
            return getattr(base, name)
        return super().__getattr__(name)

    @property
    def critic_matmul_dtype(self):
        """The wrapped loss's :attr:`~torchrl_spqr.objectives.common.EnsembleLossBase.critic_matmul_dtype`.

        Set here, it is set on the wrapped loss (a plain attribute on the wrapper would
        silently do nothing). Only the package's ensemble losses have it.
        """
        return self._ensemble_setting_owner().critic_matmul_dtype

    @critic_matmul_dtype.setter
    def critic_matmul_dtype(self, value) -> None:
        self._ensemble_setting_owner().critic_matmul_dtype = value

    @property
    def min_q_path(self) -> str:
        """The wrapped loss's :attr:`~torchrl_spqr.objectives.min_q.MinQMixin.min_q_path`.

        Set here, it is set on the wrapped loss, as :attr:`critic_matmul_dtype` is.
        """
        return self._ensemble_setting_owner("min_q_path").min_q_path

    @min_q_path.setter
    def min_q_path(self, value: str) -> None:
        self._ensemble_setting_owner("min_q_path").min_q_path = value

    def _ensemble_setting_owner(self, setting: str = "critic_matmul_dtype") -> LossModule:
        base = self._modules.get("loss_module")
        if base is None or not hasattr(type(base), setting):
            raise AttributeError(
                f"{setting}: the wrapped {type(base).__name__} has no such setting "
                "(only the package's ensemble losses: SACNLoss, ReferenceREDQLoss, EDACLoss, "
                "CQLNLoss)."
            )
        return base

    @property
    def wrapped(self) -> bool:
        """Whether a loss is wrapped (``False``: standalone)."""
        return self._modules.get("loss_module") is not None

    @property
    def tensor_keys(self):
        if self.wrapped:
            return self.loss_module.tensor_keys
        return self._tensor_keys

    def set_keys(self, **kwargs) -> None:
        """Set tensordict key names: the wrapped loss's keys when wrapping, else the own ones."""
        if self.wrapped:
            self.loss_module.set_keys(**kwargs)
        else:
            super().set_keys(**kwargs)

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    @property
    def value_estimator(self):
        """The wrapped loss's value estimator (a standalone loss has none)."""
        if self.wrapped:
            return self.loss_module.value_estimator
        return None

    @value_estimator.setter
    def value_estimator(self, value) -> None:
        if self.wrapped:
            self.loss_module.value_estimator = value
        elif value is not None:
            raise AttributeError(f"A standalone {type(self).__name__} has no value estimator.")

    def make_value_estimator(self, value_type=None, **hyperparams):
        """Delegates to the wrapped loss (a standalone loss needs no value estimator)."""
        if self.wrapped:
            self.loss_module.make_value_estimator(value_type, **hyperparams)
        return self

    @property
    def vmap_randomness(self):
        if self.wrapped:
            return self.loss_module.vmap_randomness
        return super().vmap_randomness

    def set_vmap_randomness(self, value) -> None:
        """Sets the wrapped loss's vmap randomness (and rebuilds its vmapped calls)."""
        if self.wrapped:
            self.loss_module.set_vmap_randomness(value)
            self._make_vmap()  # the wrapper's own vmapped calls follow
        else:
            if value not in ("error", "same", "different"):
                raise ValueError(
                    "Wrong vmap randomness, should be one of 'error', 'same' or 'different'."
                )
            self._vmap_randomness = value

    def named_children(self):
        """The wrapped loss, and (for :class:`~torchrl.objectives.SoftUpdate`) its targets.

        TorchRL's target updaters look for ``target_*_params`` children of the
        module they are given; yielding the wrapped loss's lets
        ``SoftUpdate(wrapper)`` update them. ``state_dict``, ``parameters``
        and ``modules`` walk the registered submodules and are unaffected.
        """
        yield from super().named_children()
        if self.wrapped:
            for name, child in self.loss_module.named_children():
                if name.startswith("target_") and name.endswith("_params"):
                    yield name, child

    # TorchRL losses register some buffers lazily (``SACLoss``/``REDQLoss``/``CrossQLoss``'s
    # ``target_entropy`` and the default value estimator's ``gamma`` at the first forward);
    # ``SACLoss.load_state_dict`` materialises ``target_entropy`` first,
    # but a wrapper's ``load_state_dict`` reaches the base through ``_load_from_state_dict``,
    # so a fresh wrapper could not load a trained one's state. Do the same here.
    _LAZY_BASE_ATTRS = ("target_entropy",)

    def _materialise_lazy_buffers(self) -> None:
        for attr in self._LAZY_BASE_ATTRS:
            if isinstance(getattr(type(self.loss_module), attr, None), property):
                # target_entropy="auto" without an action spec raises: the base raises the
                # same clear error at its first forward, and the state dict reports the key.
                with contextlib.suppress(RuntimeError, ValueError, AttributeError):
                    getattr(self.loss_module, attr)

    def state_dict(self, *args, **kwargs):
        if self.wrapped:
            self._materialise_lazy_buffers()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads a state of this class, or a bare state of the wrapped loss's class.

        A state without the ``loss_module.`` prefix (``SACLoss(...).state_dict()``)
        is loaded into the wrapped loss; the wrapper's own parameters and persistent
        buffers (``SPQRLoss``'s ``beta`` and ``step_count``) keep their values unless
        the state has them.
        """
        if not self.wrapped:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._materialise_lazy_buffers()
        base = self.loss_module
        prefix = "loss_module."
        if any(
            k.startswith("_value_estimator.") or k.startswith(prefix + "_value_estimator.")
            for k in state_dict
        ):
            # the trained loss built its default value estimator at its first forward (its
            # gamma is a buffer); reading the property builds the same default here (it
            # never replaces an existing estimator) so that the state can land
            base.value_estimator  # noqa: B018
        if state_dict and not any(k.startswith(prefix) for k in state_dict):
            own = self._own_state_names()
            inner = {k: v for k, v in state_dict.items() if k not in own}
            own_sd = {k: v for k, v in state_dict.items() if k in own}
            if own_sd:
                super().load_state_dict(
                    {**{prefix + k: v for k, v in base.state_dict().items()}, **own_sd},
                    strict=False,
                    assign=assign,
                )
            return base.load_state_dict(inner, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _own_state_names(self) -> set[str]:
        """The wrapper's own entries of its state dict (not under ``loss_module.``)."""
        buffers = {k for k in self._buffers if k not in self._non_persistent_buffers_set}
        return buffers | set(self._parameters)

    def _apply(self, fn):
        out = super()._apply(fn)
        # tensordict caches ``detach()`` of (locked) TensorDictParams and does not erase
        # that cache on dtype/device moves, so after a first forward ``.double()`` /
        # ``.to(device)`` left TorchRL's detached critic params (e.g. SACLoss's actor-loss
        # call) on the old dtype/device. Drop the stale copies.
        for module in self.modules():
            if isinstance(module, TensorDictParams):
                module._erase_cache()
            if isinstance(module, LossModule):
                module._erase_cache()
        return out
