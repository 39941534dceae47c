"""pytest plugin: make TorchRL's own loss tests build SPQR-wrapped losses.

Loaded with ``-p spqr_wrap_plugin`` (the directory of this file on
``PYTHONPATH``) while running TorchRL's ``test/objectives`` tests. After
collection it replaces, in the namespace of every collected test module, the
names ``SACLoss``, ``REDQLoss``, ``TD3Loss`` and ``CQLLoss`` by a *shim class*.
No TorchRL file is edited.

Mode (environment variable ``SPQR_WRAP_MODE``):

- ``wrap`` (default): ``SACLoss(...)`` in a test returns
  ``SPQRLoss(SACLoss(..., num_qvalue_nets=max(3, n)), beta=0)``;
- ``n3``: control run, the ensemble is raised to ``max(3, n)`` critics but the
  loss is *not* wrapped. A test that passes bare and in ``n3`` but fails in
  ``wrap`` fails because of the wrapper, not because of the larger ensemble.

Ensemble size: SPQR needs at least 3 critics. ``num_qvalue_nets`` (SAC, TD3,
REDQ; SAC and TD3 default to 2) is raised to ``max(3, n)``. A list of fewer
than 3 critic modules is extended with deep copies of its last member whose
parameters are re-initialised.

CQL: TorchRL's ``CQLLoss`` is fixed at 2 critics. The shim builds
``EnsembleCQLLoss`` (an N-critic generalisation with CQLLoss's constructor
plus ``num_qvalue_nets``) from ``torchrl_spqr.objectives`` or from the
``module:attr`` given in ``SPQR_WRAP_CQL_CLASS``; when it cannot be imported,
every test constructing a CQLLoss is *skipped* in the ``wrap``/``n3`` runs
(reason starts with ``spqr-wrap: no N-critic CQL``).

Why a shim class rather than a factory function: the test modules also use
the names as classes (``isinstance(loss, SACLoss)``, ``SACLoss._AcceptedKeys``,
``SACLoss.default_keys``, ``issubclass``). The shim's metaclass forwards class
attribute access to the original class, makes ``isinstance`` true for the
original losses and for an ``SPQRLoss`` whose ``loss_module`` is one, and makes
``issubclass`` follow the original class; calling it builds the wrapped loss.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import os
from typing import Any

import pytest
import torch

MODE = os.environ.get("SPQR_WRAP_MODE", "wrap")
BETA = float(os.environ.get("SPQR_WRAP_BETA", "0"))
# SPQR_WRAP_ADD_TO=loss_qvalue and SPQR_WRAP_DIAGNOSTICS=0 give the silent drop-in configuration
# (the output has exactly the wrapped loss's entries); the default is SPQRLoss's default.
ADD_TO = os.environ.get("SPQR_WRAP_ADD_TO") or None
DIAGNOSTICS = int(os.environ.get("SPQR_WRAP_DIAGNOSTICS", "1"))
MIN_CRITICS = int(os.environ.get("SPQR_WRAP_MIN_CRITICS", "3"))
CQL_CLASS = os.environ.get("SPQR_WRAP_CQL_CLASS", "torchrl_spqr.objectives:EnsembleCQLLoss")
TARGET_NAMES = ("SACLoss", "REDQLoss", "TD3Loss", "CQLLoss")

if MODE not in ("wrap", "n3"):
    raise ValueError(f"SPQR_WRAP_MODE must be 'wrap' or 'n3', got {MODE!r}")


def _load_attr(spec: str):
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr)


_CQL_CACHE: dict[str, Any] = {}


def _ensemble_cql_cls():
    if "cls" not in _CQL_CACHE:
        try:
            _CQL_CACHE["cls"] = _load_attr(CQL_CLASS)
            _CQL_CACHE["err"] = None
        except Exception as err:  # ImportError, AttributeError
            _CQL_CACHE["cls"] = None
            _CQL_CACHE["err"] = f"{type(err).__name__}: {err}"
    return _CQL_CACHE["cls"]


def _spqr_cls():
    from torchrl_spqr import SPQRLoss

    return SPQRLoss


def _reinit(module: torch.nn.Module) -> torch.nn.Module:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            with contextlib.suppress(Exception):  # lazy modules etc.: keep the copied values
                reset()
    return module


def _default(orig: type, name: str, fallback: Any) -> Any:
    try:
        p = inspect.signature(orig.__init__).parameters.get(name)
    except (TypeError, ValueError):
        p = None
    if p is None or p.default is inspect.Parameter.empty:
        return fallback
    return p.default


def _build(orig: type, args: tuple, kwargs: dict) -> Any:
    args = list(args)
    kwargs = dict(kwargs)
    is_cql = orig.__name__ == "CQLLoss"
    has_n = "num_qvalue_nets" in inspect.signature(orig.__init__).parameters

    # The critic argument: keyword or 2nd positional.
    if "qvalue_network" in kwargs:
        q = kwargs["qvalue_network"]
        where = "kw"
    elif len(args) >= 2:
        q = args[1]
        where = "pos"
    else:
        q, where = None, None

    # CQLLoss: two critics, always
    n = 2 if is_cql else kwargs.get("num_qvalue_nets", _default(orig, "num_qvalue_nets", 2))
    if isinstance(q, (list, tuple)):
        n = max(n, len(q)) if not has_n else n
        if len(q) < MIN_CRITICS:
            q = list(q) + [_reinit(copy.deepcopy(q[-1])) for _ in range(MIN_CRITICS - len(q))]
            if where == "kw":
                kwargs["qvalue_network"] = q
            else:
                args[1] = q
    n3 = max(MIN_CRITICS, n)

    if is_cql:
        cls = _ensemble_cql_cls()
        if cls is None:
            pytest.skip(f"spqr-wrap: no N-critic CQL ({CQL_CLASS}: {_CQL_CACHE['err']})")
        kwargs["num_qvalue_nets"] = n3
        loss = cls(*args, **kwargs)
    else:
        if has_n:
            kwargs["num_qvalue_nets"] = n3
        loss = orig(*args, **kwargs)

    if MODE == "n3":
        return loss
    return _spqr_cls()(loss, beta=BETA, add_to=ADD_TO, diagnostics_interval=DIAGNOSTICS)


class _ShimMeta(type):
    """Metaclass of the shims: calling builds the wrapped loss; the rest forwards."""

    def __call__(cls, *args, **kwargs):
        return _build(cls._spqr_orig, args, kwargs)

    def __instancecheck__(cls, obj) -> bool:
        orig = cls._spqr_orig
        if isinstance(obj, orig):
            return True
        inner = (
            obj.__dict__.get("_modules", {}).get("loss_module")
            if hasattr(obj, "__dict__")
            else None
        )
        return inner is not None and isinstance(inner, orig)

    def __subclasscheck__(cls, sub) -> bool:
        return isinstance(sub, type) and issubclass(sub, cls._spqr_orig)

    def __getattr__(cls, name):
        # only reached for names the shim itself lacks: static methods,
        # _AcceptedKeys, default_keys, default_value_estimator, ...
        return getattr(cls._spqr_orig, name)


def make_shim(orig: type) -> type:
    return _ShimMeta(
        orig.__name__,
        (),
        {
            "_spqr_orig": orig,
            "__module__": orig.__module__,
            "__qualname__": orig.__qualname__,
            "__doc__": orig.__doc__,
        },
    )


_SHIMS: dict[type, type] = {}


def _shim_for(orig: type) -> type:
    if orig not in _SHIMS:
        _SHIMS[orig] = make_shim(orig)
    return _SHIMS[orig]


def _originals() -> dict[str, type]:
    from torchrl.objectives import CQLLoss, SACLoss, TD3Loss
    from torchrl.objectives.redq import REDQLoss

    return {"SACLoss": SACLoss, "REDQLoss": REDQLoss, "TD3Loss": TD3Loss, "CQLLoss": CQLLoss}


def pytest_report_header(config):
    cql = _ensemble_cql_cls()
    import torchrl_spqr

    return [
        f"spqr-wrap: mode={MODE} beta={BETA} add_to={ADD_TO} diagnostics={DIAGNOSTICS} "
        f"min_critics={MIN_CRITICS} "
        f"torchrl_spqr={torchrl_spqr.__file__}",
        f"spqr-wrap: N-critic CQL = {CQL_CLASS} -> "
        + (
            "found"
            if cql is not None
            else f"NOT importable ({_CQL_CACHE['err']}); CQL tests skipped"
        ),
    ]


def pytest_collection_modifyitems(session, config, items):
    originals = _originals()
    seen = set()
    for item in items:
        mod = getattr(item, "module", None)
        if mod is None or id(mod) in seen:
            continue
        seen.add(id(mod))
        for name in TARGET_NAMES:
            obj = mod.__dict__.get(name)
            if obj is not None and obj is originals[name]:
                setattr(mod, name, _shim_for(obj))
