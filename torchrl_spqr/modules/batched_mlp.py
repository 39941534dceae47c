"""The batched evaluation of an MLP ensemble's members: :class:`BatchedMLP`.

Split from :mod:`torchrl_spqr.modules.ensemble` (which re-exports it): the
stacked ``[N, ...]`` parameters of ``N`` members run as batched matrix
products, not ``N`` module calls.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from torchrl_spqr.modules.relu_mlp import ensemble_relu_mlp, relu_mlp_layers

__all__ = ["BatchedMLP"]


class _ConcatMLP(nn.Module):
    """Concatenates its inputs on the last dim and applies ``net``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(inputs, -1) if len(inputs) > 1 else inputs[0])


class BatchedMLP:
    """All members of an MLP critic evaluated with batched matrix products.

    For stacked parameters ``[N, ...]`` of a member built by :func:`make_q_member`
    (or TorchRL's ``MLP`` in a ``TensorDictModule``), ``Linear`` layers run as one
    ``matmul``/``baddbmm`` over the ensemble, parameter-free layers (activations,
    dropout: a fresh mask per element, hence per member) apply elementwise and
    ``LayerNorm`` uses each member's affine parameters. Measured about 20% faster
    than ``torch.vmap`` over the module (or a Python loop) for 10 members of
    256x256 on CPU. :meth:`from_member` returns ``None`` for other structures,
    which then use ``torch.vmap``.

    Members of the form ``Linear (-> ReLU -> Linear)*`` with biases (the
    default critic of :func:`~torchrl_spqr.modules.ensemble.make_q_member`)
    run as one autograd node with a hand-written backward,
    :func:`~torchrl_spqr.modules.relu_mlp.ensemble_relu_mlp`: same values and
    gradients, less memory traffic (``benchmarks/bench_population.py``
    measures the two side by side). :attr:`use_fused_kernel` turns it off.
    """

    _ELEMENTWISE = (
        nn.ReLU,
        nn.Tanh,
        nn.ELU,
        nn.SiLU,
        nn.LeakyReLU,
        nn.GELU,
        nn.Identity,
        nn.Dropout,
    )

    #: ``Linear (-> ReLU -> Linear)*`` members run as one autograd node with a hand-written
    #: backward (:func:`~torchrl_spqr.modules.relu_mlp.ensemble_relu_mlp`); set ``False``
    #: (on the class or an instance) for the op-by-op path, e.g. to compare the two.
    use_fused_kernel: bool = True

    #: a lower precision for the fused kernel's products below the last layer
    #: (``torch.bfloat16``; ``None``: the parameters' dtype), see
    #: :func:`~torchrl_spqr.modules.relu_mlp.ensemble_relu_mlp`. Parameters, Q-values and
    #: gradients stay in full precision. Set it on the class or an instance.
    matmul_dtype: torch.dtype | None = None

    def __init__(self, prefix: tuple[str, ...], layers: list[tuple[str, str, nn.Module]]) -> None:
        self.prefix = prefix
        self.layers = layers
        # Linear (-> ReLU -> Linear)*, all biased: one autograd node (modules/relu_mlp.py)
        self._fused = relu_mlp_layers([(name, sub) for _, name, sub in layers])

    @classmethod
    def from_member(cls, member: nn.Module) -> BatchedMLP | None:
        mod = getattr(member, "module", None)
        if isinstance(mod, _ConcatMLP) and isinstance(mod.net, nn.Sequential):
            prefix, seq = ("module", "net"), mod.net
        elif isinstance(mod, nn.Sequential) and type(mod).__name__ == "MLP":
            prefix, seq = ("module",), mod
        else:
            return None
        layers: list[tuple[str, str, nn.Module]] = []
        for name, sub in seq.named_children():
            if isinstance(sub, nn.Linear):
                layers.append(("linear", name, sub))
            elif isinstance(sub, nn.LayerNorm) and len(sub.normalized_shape) == 1:
                layers.append(("layernorm", name, sub))
            elif isinstance(sub, cls._ELEMENTWISE):
                layers.append(("elementwise", name, sub))
            else:
                return None
        return cls(prefix, layers)

    @property
    def fusable(self) -> bool:
        """Whether the members are ``Linear (-> ReLU -> Linear)*`` (the fused kernel's structure)."""
        return self._fused is not None

    @property
    def deterministic(self) -> bool:
        """``False`` when a dropout layer is active (two calls would draw different masks)."""
        return not any(
            isinstance(sub, nn.Dropout) and sub.p > 0 and sub.training for _, _, sub in self.layers
        )

    def __call__(self, params, inputs: list[torch.Tensor], *, ensemble_in_input: bool = False):
        """``inputs`` ``[*batch, d_i]`` (or ``[N, *batch, d_i]``) -> ``[N, *batch, out]``."""
        x = torch.cat(inputs, -1) if len(inputs) > 1 else inputs[0]
        n = params.batch_size[0]
        batch = x.shape[1:-1] if ensemble_in_input else x.shape[:-1]
        h = x.reshape(n, -1, x.shape[-1]) if ensemble_in_input else x.reshape(-1, x.shape[-1])
        if self._fused is not None and self.use_fused_kernel:
            get = params.get
            h = ensemble_relu_mlp(
                h,
                [get((*self.prefix, name, "weight")) for name in self._fused],
                [get((*self.prefix, name, "bias")) for name in self._fused],
                matmul_dtype=self.matmul_dtype,
            )
            return h.reshape(n, *batch, h.shape[-1])
        if self.matmul_dtype is not None:
            warnings.warn(
                f"BatchedMLP.matmul_dtype={self.matmul_dtype} applies to the fused kernel only; "
                + (
                    "use_fused_kernel is False"
                    if self._fused is not None
                    else "these members are not Linear (-> ReLU -> Linear)*"
                )
                + ", so the products run in the parameters' dtype.",
                stacklevel=2,
            )
        fresh = False  # h is an intermediate of this call (safe to modify in place)
        for kind, name, sub in self.layers:
            if kind == "elementwise" and fresh and type(sub) is nn.ReLU:
                # in place on the layer output: the producing op (bmm/add) does not save it
                h = torch.relu_(h)
                continue
            fresh = kind != "elementwise"
            if kind == "linear":
                w = params.get((*self.prefix, name, "weight"))
                b = params.get((*self.prefix, name, "bias"), None)
                if h.dim() == 2:  # shared input: broadcast over the members
                    h = torch.matmul(h, w.transpose(-1, -2))
                    if b is not None:  # in place: matmul does not save its output
                        h = h.add_(b.unsqueeze(-2))
                elif b is not None:
                    h = torch.baddbmm(b.unsqueeze(-2), h, w.transpose(-1, -2))
                else:
                    h = torch.bmm(h, w.transpose(-1, -2))
            elif kind == "layernorm":
                if h.dim() == 2:
                    h = h.expand(n, *h.shape)
                h = torch.nn.functional.layer_norm(h, sub.normalized_shape, eps=sub.eps)
                if sub.elementwise_affine:
                    h = h * params.get((*self.prefix, name, "weight")).unsqueeze(-2)
                    bias = params.get((*self.prefix, name, "bias"), None)
                    if bias is not None:
                        h = h + bias.unsqueeze(-2)
            else:
                h = sub(h)
        if h.dim() == 2:
            h = h.expand(n, *h.shape)
        return h.reshape(n, *batch, h.shape[-1])

    def select(self, params, inputs: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """``out[b] = member_{index[b]}(x[b])``: each row through one chosen member.

        ``inputs`` ``[B, d_i]``, ``index`` ``[B]`` (long) -> ``[B, out]``. Rows are
        grouped by member into a zero-padded ``[K, c, d]`` block (``K`` the members
        chosen at least once, ``c`` the largest group) evaluated with the same
        batched products, so the cost is about ``K c / (N B)`` of a full pass. Gradients flow to the inputs (and to
        ``params`` if they require it) exactly as through the chosen members.
        """
        x = torch.cat(inputs, -1) if len(inputs) > 1 else inputs[0]
        if x.dim() != 2 or index.shape != x.shape[:1]:
            raise ValueError(
                f"select expects inputs [B, d] and index [B], got {tuple(x.shape)} and "
                f"{tuple(index.shape)}."
            )
        n, rows = params.batch_size[0], x.shape[0]
        counts = torch.bincount(index, minlength=n)
        used = counts.nonzero().squeeze(-1)
        if used.numel() < n:  # members no row chose are skipped entirely
            remap = torch.full_like(counts, -1)
            remap[used] = torch.arange(used.numel(), device=used.device)
            params, index, counts, n = params[used], remap[index], counts[used], used.numel()
        order = torch.argsort(index, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.empty_like(index)
        pos[order] = torch.arange(rows, device=x.device) - starts[index[order]]
        padded = x.new_zeros(n, int(counts.max()), x.shape[-1]).index_put((index, pos), x)
        return self(params, [padded], ensemble_in_input=True)[index, pos]
