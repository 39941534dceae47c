"""An ensemble of independently initialised critics, evaluated in one vmapped call.

:class:`QEnsemble` builds ``N`` critics, each with its own layers' own
initialisation (never TorchRL's expand-and-resample of one module, which leaves
zero biases identical across members), holds their parameters stacked along a
leading ensemble dim and evaluates all of them with a single :func:`torch.vmap`
call.

It plugs into TorchRL's ensemble losses in two ways:

- ``SACLoss(actor, ens.members(), num_qvalue_nets=ens.num_members)`` (also
  ``REDQLoss``, ``TD3Loss``): TorchRL stacks the list of independent members
  itself, so nothing is re-initialised;
- ``ens.tie_to_loss(loss)`` afterwards makes the ensemble read the loss's
  (trained) parameters, so evaluating ``ens`` always reflects training.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import numbers
import operator
from collections.abc import Callable, Iterator, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictParams
from tensordict.utils import NestedKey
from torch import nn

from torchrl_spqr.modules.batched_mlp import BatchedMLP, _ConcatMLP

__all__ = ["INIT_SCHEMES", "BatchedMLP", "QEnsemble", "init_linear_stack_", "make_q_member"]

_RESETTABLE_WITHOUT_PARAMS = (nn.Dropout, nn.Identity, nn.ReLU, nn.Tanh, nn.SiLU, nn.ELU)


def make_q_member(
    in_features: int | None = None,
    *,
    num_cells: Sequence[int] = (256, 256),
    activation_class: type[nn.Module] = nn.ReLU,
    layer_norm: bool = False,
    dropout: float = 0.0,
    in_keys: Sequence[NestedKey] = ("observation", "action"),
    out_keys: Sequence[NestedKey] = ("state_action_value",),
    init: str = "default",
) -> TensorDictModule:
    """One critic ``Q(s, a)``: an MLP on the concatenated inputs, as a TensorDictModule.

    ``layer_norm`` and ``dropout`` (DroQ-style, after each hidden linear layer)
    are optional. With ``in_features=None`` the first layer is lazy (then only
    ``init="default"``). ``init`` is one of :data:`INIT_SCHEMES` (see
    :func:`init_linear_stack_`); each call draws its own weights, so the members
    of a :class:`QEnsemble` stay independent under every scheme.

    Examples:
        >>> member = make_q_member(14, num_cells=(32, 32), layer_norm=True, dropout=0.01)
        >>> from tensordict import TensorDict
        >>> td = TensorDict({"observation": torch.randn(5, 11), "action": torch.randn(5, 3)}, [5])
        >>> member(td)["state_action_value"].shape
        torch.Size([5, 1])
    """
    layers: list[nn.Module] = []
    prev = in_features
    for width in num_cells:
        layers.append(nn.Linear(prev, width) if prev is not None else nn.LazyLinear(width))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        if layer_norm:
            layers.append(nn.LayerNorm(width))
        layers.append(activation_class())
        prev = width
    layers.append(nn.Linear(prev, 1) if prev is not None else nn.LazyLinear(1))
    _check_init(init)
    if init != "default":
        if in_features is None:
            raise ValueError(
                f"make_q_member(init={init!r}) needs in_features (a lazy first layer has no "
                "weights to initialise yet); pass in_features or use init='default'."
            )
        init_linear_stack_([m for m in layers if isinstance(m, nn.Linear)], init)
    net = _ConcatMLP(nn.Sequential(*layers))
    return TensorDictModule(net, in_keys=list(in_keys), out_keys=list(out_keys))


#: Weight initialisations of :func:`init_linear_stack_` (``network.init`` in the configs).
INIT_SCHEMES = ("default", "edac", "redq")


def _check_init(init: str) -> None:
    if not isinstance(init, str) or init not in INIT_SCHEMES:
        raise ValueError(f"init={init!r}: expected one of {', '.join(INIT_SCHEMES)}.")


@torch.no_grad()
def init_linear_stack_(
    linears: Sequence[nn.Linear], init: str, *, output_bound: float = 3e-3
) -> None:
    """Re-initialise an MLP's linear layers (in order, the last one the output) in place.

    - ``"default"``: left as PyTorch draws them (weights and biases uniform in
      +-1/sqrt(fan_in)).
    - ``"edac"``: EDAC's and CORL's: hidden weights kept (PyTorch's uniform in
      +-1/sqrt(fan_in), the bound of EDAC's ``fanin_init``), hidden biases 0.1, output
      weights and bias uniform in +-``output_bound`` (3e-3 for critics, 1e-3 for the
      policy). Sources: ``snu-mllab/EDAC`` ``lifelong_rl/models/networks.py`` l. 312-360,
      ``lifelong_rl/policies/models/tanh_gaussian_policy.py`` l. 43, 63-64;
      ``tinkoff-ai/CORL`` ``algorithms/offline/sac_n.py`` l. 220-226, 280-284.
    - ``"redq"``: REDQ's ``weights_init_``: Xavier-uniform weights (gain 1), zero
      biases, every layer (``watchernyu/REDQ`` ``redq/algos/core.py`` l. 18-22).
    """
    _check_init(init)
    linears = list(linears)
    if init == "default" or not linears:
        return
    for i, lin in enumerate(linears):
        last = i == len(linears) - 1
        if init == "redq":
            nn.init.xavier_uniform_(lin.weight, gain=1.0)
            nn.init.zeros_(lin.bias)
        elif last:
            nn.init.uniform_(lin.weight, -output_bound, output_bound)
            nn.init.uniform_(lin.bias, -output_bound, output_bound)
        else:
            nn.init.constant_(lin.bias, 0.1)


def _reinit_(module: nn.Module) -> None:
    """Re-draw every parameter of ``module`` with its layers' own ``reset_parameters``."""
    seen: set[int] = set()
    for sub in module.modules():
        own = list(sub.parameters(recurse=False))
        if not own:
            continue
        reset = getattr(sub, "reset_parameters", None)
        if reset is None:
            raise ValueError(
                f"Cannot re-initialise {type(sub).__name__} independently: it has parameters "
                "but no reset_parameters(). Pass a factory that builds a fresh member instead "
                "of a template."
            )
        reset()
        seen.update(id(p) for p in own)
    missing = [n for n, p in module.named_parameters() if id(p) not in seen]
    if missing:  # pragma: no cover - defensive
        raise ValueError(f"Parameters {missing} were not re-initialised.")


class QEnsemble(TensorDictModuleBase):
    """``N`` independently initialised critics with stacked parameters.

    Args:
        factory: a callable returning a fresh critic for each member (a
            :class:`~tensordict.nn.TensorDictModule`, or a plain ``nn.Module``
            taking the ``in_keys`` tensors positionally), or ``None`` with
            ``template``.
        num_members: ensemble size ``N``.
        template: alternative to ``factory``: a critic that is deep-copied ``N``
            times, each copy re-initialised with its layers' ``reset_parameters``.
            Custom initialisation in a constructor is lost this way; prefer a
            factory.
        in_keys / out_keys: used only when members are plain modules; otherwise
            taken from the members.
        randomness: ``torch.vmap`` randomness; ``"different"`` (default) gives
            each member its own dropout mask.
        allow_shared: build the ensemble even when members share parameter or
            buffer tensors, or are identical in value (default ``False``: such
            members are refused, see below). Each member then starts as its own
            copy of those values (nothing stays tied), so the members start
            identical where they shared.

    Members are checked before stacking: ``num_members`` must be a whole number
    (``2.5`` is refused, ``10.0`` reads as 10); all members must have the same
    parameter and buffer names, shapes, dtypes and devices (the first mismatch
    is named); and, unless ``allow_shared=True``, no two members may share a
    tensor (by storage: a factory wrapping one shared module, or modules
    re-using one parameter) or hold exactly the same values in every parameter
    and buffer (e.g. a factory that reseeds before building). Identical critics
    stay identical under training (SPQR's gradient is exactly zero there), so
    the ensemble would silently be one critic.

    The members' values are copied into the stacked ``params``: modules the
    factory returns (or the ``template``) are never modified, so a module the
    caller keeps stays as it was (its parameters are not moved or tied).

    The forward returns a new TensorDict of batch ``[N, *batch]`` with
    ``out_keys`` (e.g. ``state_action_value`` of shape ``[N, *batch, 1]``): the
    ensemble is the leading dim, as in TorchRL's vmapped losses.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_spqr import QEnsemble, make_q_member
        >>> ens = QEnsemble(lambda: make_q_member(11 + 3, num_cells=(64, 64)), num_members=10)
        >>> td = TensorDict({"observation": torch.randn(256, 11), "action": torch.randn(256, 3)}, [256])
        >>> ens(td)["state_action_value"].shape
        torch.Size([10, 256, 1])
        >>> from torchrl.objectives import SACLoss  # doctest: +SKIP
        >>> loss = SACLoss(actor, ens.members(), num_qvalue_nets=10)  # doctest: +SKIP
        >>> ens.tie_to_loss(loss)  # doctest: +SKIP
    """

    def __init__(
        self,
        factory: Callable[[], nn.Module] | None = None,
        num_members: int | None = None,
        *,
        template: nn.Module | None = None,
        in_keys: Sequence[NestedKey] = ("observation", "action"),
        out_keys: Sequence[NestedKey] = ("state_action_value",),
        randomness: str = "different",
        allow_shared: bool = False,
    ) -> None:
        super().__init__()
        if (factory is None) == (template is None):
            raise ValueError("Pass exactly one of `factory` or `template`.")
        num_members = _ensemble_size(num_members)
        members: list[nn.Module] = []
        for _ in range(num_members):
            if factory is not None:
                m = factory()
                if not allow_shared and any(m is prev for prev in members):
                    raise ValueError(
                        "The factory returned the same module twice (e.g. `lambda: shared`): "
                        "all members would be one critic. It must build a new critic at each "
                        "call: build each member with its own init, e.g. "
                        "QEnsemble(lambda: make_q_member(in_dim), N). Pass allow_shared=True "
                        "to build identical copies on purpose."
                    )
            else:
                m = copy.deepcopy(template)
                _reinit_(m)
            if not isinstance(m, TensorDictModuleBase):
                m = TensorDictModule(m, in_keys=list(in_keys), out_keys=list(out_keys))
            members.append(m)
        self._check_materialised(members[0])
        _check_same_architecture(members)
        if not allow_shared:
            _check_independent(members)
        self.num_members = num_members
        self.in_keys = list(members[0].in_keys)
        self.out_keys = list(members[0].out_keys)
        self.randomness = randomness
        params = TensorDict.from_modules(*members, as_module=True)
        self.params = params if isinstance(params, TensorDictParams) else TensorDictParams(params)
        # The functional "shell": member 0's structure, parameters living on meta. A copy:
        # member 0 may be a module the caller keeps, which must stay as it was.
        module = _meta_copy(members[0])
        TensorDict.from_module(module).data.to("meta").to_module(module)
        self.__dict__["_module"] = module  # not a submodule: holds no real state
        self._vmapped = None

    @staticmethod
    def _check_materialised(member: nn.Module) -> None:
        for name, p in member.named_parameters():
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"Member parameter {name!r} is lazy (uninitialised). Give the critic its "
                    "input size (e.g. make_q_member(obs_dim + act_dim)) or run it once on a "
                    "batch inside the factory before building the ensemble."
                )

    @property
    def module(self) -> nn.Module:
        """The structure of one member (parameters on the ``meta`` device)."""
        return self._module

    def train(self, mode: bool = True) -> QEnsemble:
        # The shell is not a registered submodule (it holds no state), so
        # ``nn.Module.train``/``eval`` would not reach its dropout layers.
        super().train(mode)
        self._module.train(mode)
        return self

    def _call_member(self, td: TensorDictBase, params: TensorDictBase) -> TensorDictBase:
        with params.to_module(self._module, preserve_module_state=False):
            return self._module(td)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        missing = [k for k in self.in_keys if k not in tensordict.keys(True, True)]
        if missing:
            raise KeyError(f"QEnsemble input is missing keys {missing} (expects {self.in_keys}).")
        td = tensordict.select(*self.in_keys)
        return torch.vmap(self._call_member, (None, 0), randomness=self.randomness)(td, self.params)

    def q_values(self, tensordict: TensorDictBase) -> torch.Tensor:
        """``[N, *batch]`` Q-values (the first out key, trailing singleton removed)."""
        return self(tensordict).get(self.out_keys[0]).squeeze(-1)

    def members(self) -> list[TensorDictModule]:
        """``N`` stand-alone copies of the members, e.g. for TorchRL's losses.

        ``SACLoss(actor, ens.members(), num_qvalue_nets=ens.num_members)``
        stacks them without re-initialising anything.
        """
        return [_materialise(self._module, self.params[i]) for i in range(self.num_members)]

    def tie_to_loss(self, loss: nn.Module, name: str = "qvalue_network") -> QEnsemble:
        """Make this ensemble read ``loss.<name>_params`` (shared, not copied).

        After this call, evaluating the ensemble uses the parameters the loss
        trains. Shapes must match.
        """
        params = getattr(loss, f"{name}_params", None)
        if params is None:
            raise AttributeError(f"{type(loss).__name__} has no attribute {name}_params.")
        if params.batch_size[:1] != torch.Size([self.num_members]):
            raise ValueError(
                f"The loss holds {params.batch_size[:1]} critics, this ensemble {self.num_members}."
            )
        own = set(self.params.keys(True, True))
        other = set(params.keys(True, True))
        if own != other:
            raise ValueError(
                f"Parameter names differ between the ensemble and the loss: {sorted(own ^ other)}."
            )
        self.params = params
        return self

    def reset_parameters(self) -> None:
        """Re-initialise every member independently, in place."""
        with torch.no_grad():
            for i in range(self.num_members):
                m = _materialise(self._module, self.params[i])
                _reinit_(m)
                self.params[i].update_(TensorDict.from_module(m))


def _ensemble_size(value) -> int:
    """``num_members`` as an int: a positive whole number, else a clear error."""
    if value is None:
        raise ValueError("num_members must be a positive integer, got None.")
    if isinstance(value, bool):
        raise TypeError(f"num_members must be a positive integer, got {value!r} (bool).")
    try:
        n = operator.index(value)
    except TypeError:
        if not isinstance(value, numbers.Real):
            raise TypeError(
                f"num_members must be a positive integer, got {value!r} ({type(value).__name__})."
            ) from None
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(
                f"num_members must be a whole number of critics, got {value!r}: pass an int "
                f"(e.g. {max(math.floor(value), 1) if math.isfinite(value) else 10})."
            ) from None
        n = int(value)
    if n < 1:
        raise ValueError(f"num_members must be a positive integer, got {value!r}.")
    return n


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(kind, name, tensor)`` for every parameter and buffer of ``module``."""
    for name, p in module.named_parameters():
        yield "parameter", name, p
    for name, b in module.named_buffers():
        yield "buffer", name, b


def _check_same_architecture(members: list[nn.Module]) -> None:
    """All members have the same tensor names, shapes, dtypes and devices (else: the first
    mismatch, named)."""
    fix = (
        "All members of a QEnsemble must have one architecture (only their initial values may "
        "differ): make the factory build the same network at every call."
    )
    ref = {name: (kind, t) for kind, name, t in _named_tensors(members[0])}
    keys0 = (list(members[0].in_keys), list(members[0].out_keys))
    for i, m in enumerate(members[1:], 1):
        keys = (list(m.in_keys), list(m.out_keys))
        if keys != keys0:
            raise ValueError(
                f"Member {i} reads/writes in_keys={keys[0]}, out_keys={keys[1]} but member 0 "
                f"in_keys={keys0[0]}, out_keys={keys0[1]}. {fix}"
            )
        cur = {name: (kind, t) for kind, name, t in _named_tensors(m)}
        for name, (kind, t0) in ref.items():
            if name not in cur:
                raise ValueError(f"Member {i} has no {kind} {name!r}, which member 0 has. {fix}")
            t = cur[name][1]
            for what, a, b in (
                ("shape", tuple(t0.shape), tuple(t.shape)),
                ("dtype", t0.dtype, t.dtype),
                ("device", t0.device, t.device),
            ):
                if a != b:
                    raise ValueError(
                        f"Member {i} differs from member 0 in {kind} {name!r}: {what} {b} "
                        f"vs {a}. {fix}"
                    )
        extra = [name for name in cur if name not in ref]
        if extra:
            kind = cur[extra[0]][0]
            raise ValueError(f"Member {i} has a {kind} {extra[0]!r} that member 0 lacks. {fix}")


def _check_independent(members: list[nn.Module]) -> None:
    """No two members share a tensor (by storage) or hold identical values in all of them."""
    fix = (
        "Build each member with its own init (a factory that creates a new critic, with its "
        "own parameters, at every call, e.g. QEnsemble(lambda: make_q_member(in_dim), N)), "
        "or pass allow_shared=True to build the ensemble anyway (each member then starts as "
        "a copy of those values)."
    )
    # by memory: the same tensor, or views of one storage whose byte ranges overlap
    regions: dict[tuple, list[tuple[int, int, int, str]]] = {}
    for i, m in enumerate(members):
        for _, name, t in _named_tensors(m):
            if t.numel() == 0 or t.device.type == "meta":
                continue
            start = t.data_ptr()
            span = sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride()))
            end = start + (span + 1) * t.element_size()
            key = (t.device, t.untyped_storage().data_ptr())
            for s0, e0, j, other in regions.get(key, ()):
                if j != i and start < e0 and s0 < end:
                    raise ValueError(
                        f"Members {j} and {i} share a tensor ({other!r} of member {j} and "
                        f"{name!r} of member {i} are the same memory): the factory wraps one "
                        "shared module or shared parameter tensors, so the critics would be "
                        "the same function and stay identical in training (SPQR's gradient is "
                        f"zero for identical members). {fix}"
                    )
            regions.setdefault(key, []).append((start, end, i, name))
    seen: dict[bytes, int] = {}
    for i, m in enumerate(members):
        digest = hashlib.blake2b(digest_size=32)
        for _, name, t in _named_tensors(m):
            digest.update(name.encode())
            flat = t.detach().reshape(-1)
            digest.update(flat.view(torch.uint8).cpu().numpy().tobytes() if flat.numel() else b"")
        first = seen.setdefault(digest.digest(), i)
        if first != i:
            raise ValueError(
                f"Members {first} and {i} are identical in value (every parameter and buffer "
                "is equal, e.g. a factory that re-seeds or copies one module): the critics "
                "would stay identical in training (SPQR's gradient is zero for identical "
                f"members). {fix}"
            )


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on ``meta`` (no data copied)."""
    memo: dict[int, object] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = t.detach().to("meta")
        if isinstance(t, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=t.requires_grad)
        memo[id(t)] = meta
    return copy.deepcopy(module, memo)


def _materialise(shell: nn.Module, params: TensorDictBase) -> nn.Module:
    """A real module with the structure of ``shell`` and the values of ``params``."""
    m = copy.deepcopy(shell)
    m.to_empty(device=next(iter(params.values(True, True))).device)
    TensorDict.from_module(m).data.update_(params.detach())
    return m
