"""An ensemble of ReLU MLPs as one autograd node with a hand-written backward.

:func:`ensemble_relu_mlp` evaluates ``N`` members of ``Linear -> ReLU -> ... ->
Linear`` (stacked parameters ``[N, out, in]`` / ``[N, out]``) with batched
matrix products, like :class:`~torchrl_spqr.modules.ensemble.BatchedMLP`, but
as one :class:`torch.autograd.Function`, so that its backward can be written
for the CPU's memory traffic rather than left to the op-by-op autograd graph:

* the ReLU's backward masks the incoming gradient in place
  (``threshold_backward`` into its own input) instead of allocating a new
  ``[N, B, H]`` tensor per layer;
* the weight gradient is computed directly in the weight's ``[N, out, in]``
  layout (``g^T @ h``), with no transposing copy of a ``[N, H, H]`` tensor;
* the first layer's bias rides in its matrix product (an input column of
  ones), and the last layer's input gradient (``[N, B, 1] x [N, 1, H]``) is a
  broadcast product rather than a batched matmul with an inner size of one;
* gradients that are not needed are not computed: the target pass records
  nothing, the actor-loss pass (detached critic parameters) computes the
  input gradient only;
* with ``matmul_dtype`` (bfloat16 or float16 products), the ReLU and its
  backward run on the ``int16`` view of the bits (exact, and several times
  faster than PyTorch's CPU kernels for these dtypes, which convert every
  element to float32 and back), the hidden layers' bias is added by the
  product (``baddbmm``), and the hidden weights are cast once per forward and
  kept for the backward; in bfloat16, the last layer reads the bfloat16
  activation directly, with float32 accuracy (:func:`_last_layer_from_bf16`).

Same values and gradients as the op-by-op path, up to float round-off (the
tests compare them). Under :func:`torch.vmap` (a population of agents,
:mod:`torchrl_spqr.training.population`) the function's own vmap rule folds
the vmapped dimension into the ensemble one, so ``K`` agents' ``N`` members run
as one ensemble of ``K * N`` members; the autograd node then lives on the
plain tensors, and its backward runs outside vmap. The backward is not itself
differentiable (no double backward; nothing in the package's losses needs it).

Pure tensor code (no modules), kept apart so it can be tested alone.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MATMUL_DTYPES", "ensemble_relu_mlp", "matmul_slowdown", "relu_mlp_layers"]

#: The lower precisions ``ensemble_relu_mlp(..., matmul_dtype=)`` accepts.
MATMUL_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def matmul_slowdown(dtype: torch.dtype, device: str = "cpu", size: int = 256) -> float:
    """How many times longer a batched product takes in ``dtype`` than in float32 here.

    Times ``torch.bmm`` of two ``[4, size, size]`` tensors (a critic layer's shape at the
    default 256) in both dtypes on ``device``, best of 3 after a warm-up, on one CPU thread
    (per-core speed is what differs, and one thread is the least disturbed by other
    processes on the cores), and returns the ratio of the times: below 1 where ``dtype``
    is faster (a CPU with AMX or AVX512-BF16, a GPU), well above 1 where the CPU has no
    instructions for it and PyTorch emulates it (about 50-75 for bfloat16 on an AVX2-only
    AMD EPYC; about 0.4 s there, milliseconds elsewhere). Measured once per process and
    argument tuple.

    Example:
        >>> import torch
        >>> from torchrl_spqr.modules.relu_mlp import matmul_slowdown
        >>> matmul_slowdown(torch.bfloat16) > 0
        True
    """
    dev = torch.device(device)
    threads = torch.get_num_threads()

    def best(dt: torch.dtype) -> float:
        a = torch.randn(4, size, size, device=dev).to(dt)
        b = torch.randn(4, size, size, device=dev).to(dt)
        times = []
        for _ in range(4):  # the first is a warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            torch.bmm(a, b)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        return max(min(times[1:]), 1e-9)

    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        return best(dtype) / best(torch.float32)
    finally:
        torch.set_num_threads(threads)


def ensemble_relu_mlp(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    *,
    matmul_dtype: torch.dtype | None = None,
) -> Tensor:
    """``N`` ReLU MLPs with stacked parameters, as one autograd node.

    Args:
        x: the input, ``[B, d]`` (shared by the members) or ``[N, B, d]``
            (member ``n``'s input in row ``n``).
        weights: ``L >= 1`` stacked ``Linear`` weights, ``[N, out_l, in_l]``.
        biases: the ``L`` stacked biases, ``[N, out_l]``.
        matmul_dtype: a lower precision for the products of every layer but
            the last (``torch.bfloat16`` or ``torch.float16``; ``None``, the
            default: the parameters' dtype). The operands are rounded to it,
            the hidden activations are kept in it (half the memory), and the
            products accumulate in float32 as the backend does for these
            dtypes. The last layer (the Q-values) runs in the parameters'
            dtype, and every gradient is returned in it: a mixed-precision
            forward and backward with full-precision parameters, as under
            ``torch.autocast``, but with a full-precision output.

    Returns:
        ``[N, B, out_L]``: ``Linear_L(relu(... relu(Linear_1(x))))`` per member.

    Examples:
        >>> import torch
        >>> x = torch.randn(8, 5)
        >>> w = [torch.randn(3, 16, 5), torch.randn(3, 1, 16)]
        >>> b = [torch.randn(3, 16), torch.randn(3, 1)]
        >>> q = ensemble_relu_mlp(x, w, b)
        >>> ref = torch.relu(x @ w[0].mT + b[0][:, None]) @ w[1].mT + b[1][:, None]
        >>> q.shape, torch.allclose(q, ref, atol=1e-5)
        (torch.Size([3, 8, 1]), True)
    """
    weights, biases = list(weights), list(biases)
    if not weights or len(weights) != len(biases):
        raise ValueError(
            f"ensemble_relu_mlp needs one bias per weight and at least one layer, got "
            f"{len(weights)} weights and {len(biases)} biases."
        )
    n = weights[0].shape[0]
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 3 or b.shape != (n, w.shape[1]):
            raise ValueError(
                f"layer {i}: expected a weight [N={n}, out, in] and a bias [N, out], got "
                f"{tuple(w.shape)} and {tuple(b.shape)}."
            )
        if w.shape[0] != n:
            raise ValueError(f"layer {i}: {w.shape[0]} members where layer 0 has {n}.")
        if i and w.shape[2] != weights[i - 1].shape[1]:
            raise ValueError(
                f"layer {i} takes {w.shape[2]} inputs but layer {i - 1} gives "
                f"{weights[i - 1].shape[1]}."
            )
    if x.dim() not in (2, 3) or x.shape[-1] != weights[0].shape[2]:
        raise ValueError(
            f"x must be [B, {weights[0].shape[2]}] or [N, B, {weights[0].shape[2]}], got "
            f"{tuple(x.shape)}."
        )
    if x.dim() == 3 and x.shape[0] != n:
        raise ValueError(f"x has {x.shape[0]} member rows for {n} members.")
    if matmul_dtype is not None:
        if matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(
                f"matmul_dtype must be torch.bfloat16, torch.float16 or None, got {matmul_dtype}."
            )
        if len(weights) == 1 or weights[0].dtype.itemsize <= matmul_dtype.itemsize:
            # one layer is the last one (full precision), or the parameters are no wider
            matmul_dtype = None
    out = _EnsembleReluMLP.apply(x, len(weights), matmul_dtype, *weights, *biases)
    return out[0]


def relu_mlp_layers(layers: Sequence[tuple[str, nn.Module]]) -> list[str] | None:
    """The ``Linear`` layers' names if ``layers`` is ``Linear (-> ReLU -> Linear)*``, else ``None``.

    ``layers`` are ``(name, module)`` pairs in order; every ``Linear`` must have
    a bias. Other structures (other activations, LayerNorm, dropout) return
    ``None`` and keep the op-by-op path.
    """
    names = []
    for i, (name, sub) in enumerate(layers):
        if i % 2 == 0:
            if type(sub) is not nn.Linear or sub.bias is None:
                return None
            names.append(name)
        elif type(sub) is not nn.ReLU:
            return None
    return names if len(layers) % 2 == 1 else None


def _with_ones(x: Tensor) -> Tensor:
    """``x`` with a trailing column of ones (the first layer's bias input)."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


#: ``-inf``'s bits as ``int16``, for the ReLU on the bits of the 16-bit float dtypes.
_NEG_INF_BITS = {
    dt: int(torch.tensor(-math.inf, dtype=dt).view(torch.int16)) for dt in MATMUL_DTYPES
}


def _relu_(h: Tensor) -> Tensor:
    """``relu`` in place; in a 16-bit float dtype, through the bits' ``int16`` view.

    PyTorch's CPU ``clamp_min_`` on bfloat16 converts each element to float32
    and back, several times slower than the same pass on the ``int16`` view of
    the bits. As ``int16``, a float's negative values are the negative numbers;
    those at or below ``-inf``'s pattern become ``+0``, the negative NaNs (the
    patterns above it) are kept: the same values as ``torch.relu`` (which gives
    ``-0`` for ``-0``), NaNs included.
    """
    if h.dtype not in _NEG_INF_BITS:
        return torch.relu_(h)
    torch.nn.functional.threshold_(h.view(torch.int16), _NEG_INF_BITS[h.dtype], 0)
    return h


def _relu_backward_(g: Tensor, h: Tensor) -> Tensor:
    """``g`` where ``h > 0``, else ``0``, in place (``h``: a ReLU's output, as ``g``'s dtype).

    In a 16-bit float dtype on the ``int16`` views of the bits: ``g``'s bits are
    copied where ``h``'s, as ``int16``, are positive, which for a ReLU's output
    (``+0``, positive, or NaN) is ``h > 0``, except at a NaN with the sign bit
    clear, where ``g`` is kept rather than zeroed (the forward is NaN there).
    """
    if g.dtype in _NEG_INF_BITS:
        g16, h16 = g.view(torch.int16), h.view(torch.int16)
        torch.ops.aten.threshold_backward.grad_input(g16, h16, 0, grad_input=g16)
        return g
    return torch.ops.aten.threshold_backward.grad_input(g, h, 0.0, grad_input=g)


def _forward(
    x: Tensor, weights: list[Tensor], biases: list[Tensor], mdtype: torch.dtype | None
) -> tuple[list[Tensor], list[Tensor]]:
    """The output and the hidden activations (after their ReLU), ``[N, B, h]`` each,
    and the hidden layers' weights as the products used them (``mdtype``; empty without).

    With ``mdtype`` (e.g. ``torch.bfloat16``) every layer but the last takes its
    operands in ``mdtype`` and returns its output, hence the saved activations,
    in ``mdtype``; the last layer runs in the parameters' dtype. The hidden
    layers' bias is added by the product itself (``baddbmm``: one rounding of
    product plus bias), the weights cast once and kept for the backward.
    """
    n = weights[0].shape[0]
    w1 = torch.cat([weights[0], biases[0].unsqueeze(-1)], -1)  # [N, out, in + 1]
    x1 = _with_ones(x)
    if mdtype is not None:  # never with one layer (ensemble_relu_mlp resolves it)
        w1, x1 = w1.to(mdtype), x1.to(mdtype)
    if x1.dim() == 2:
        x1 = x1.expand(n, *x1.shape)
    h = torch.bmm(x1, w1.transpose(-1, -2))
    hidden, low_weights = [], []
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights[1:], biases[1:]), 1):
        h = _relu_(h)
        hidden.append(h)
        if mdtype is not None and i < last:
            w = w.to(mdtype)
            low_weights.append(w)
            h = torch.baddbmm(b.to(mdtype).unsqueeze(-2), h, w.transpose(-1, -2))
        elif mdtype is torch.bfloat16:  # the output in full precision (Q-values, TD targets)
            h = _last_layer_from_bf16(h, w, b)
        else:
            if mdtype is not None:  # float16's range is too narrow for _last_layer_from_bf16
                h = h.to(w.dtype)
            # the bias added in place: baddbmm would first copy the expanded bias into the output
            h = torch.bmm(h, w.transpose(-1, -2)).add_(b.unsqueeze(-2))
    return [h, *hidden], low_weights


def _last_layer_from_bf16(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``h @ w^T + b`` in ``w``'s dtype from a bfloat16 ``h``, with bfloat16 products only.

    The plain way converts ``h`` (``[N, B, H]``) to float32 first: a pass that
    writes twice ``h``'s size, then a float32 product that reads it again.
    Here ``w`` is split into two bfloat16 parts, ``hi + lo`` (``lo`` carries
    ``w``'s next 8 significant bits), and two bfloat16 products of the
    ``[hi; lo]`` columns give the result: ``q``, each column's float32 sum
    rounded to bfloat16, then ``r = h @ [hi; lo]^T - q``, the rounding that
    ``q`` lost, recovered inside the second product's float32 accumulation
    (``baddbmm`` with ``beta=-1`` adds ``-q`` before its one rounding). ``q +
    r`` for both parts, summed in float32, is the float32 result to about
    ``2^-18`` of the terms' size (a float32 product's own error: about
    ``2^-22``; a bfloat16 output would be off by ``2^-9``), as the
    split-precision GEMMs that emulate float32 with bfloat16 do. Two products
    that read ``h`` in bfloat16 cost less than the conversion alone. The
    backward does not use this (the last layer's gradients are as before).
    """
    hi = w.to(torch.bfloat16)
    lo = (w - hi.to(w.dtype)).to(torch.bfloat16)
    w2 = torch.cat([hi, lo], 1).transpose(-1, -2)  # [N, H, 2 out]
    q = torch.bmm(h, w2)  # each column rounded to bfloat16
    r = torch.baddbmm(q, h, w2, beta=-1)  # what that rounding lost, rounded once more
    y = q.to(w.dtype).add_(r.to(w.dtype))
    out = w.shape[1]
    return (y[..., :out] + y[..., out:]).add_(b.unsqueeze(-2))


class _EnsembleReluMLP(torch.autograd.Function):
    """Outputs ``(y, *hidden, *low_weights)``; all but ``y`` are returned (marked
    non-differentiable) to be saved for the backward."""

    @staticmethod
    def forward(
        x: Tensor, num_layers: int, mdtype: torch.dtype | None, *params: Tensor
    ) -> tuple[Tensor, ...]:
        weights, biases = list(params[:num_layers]), list(params[num_layers:])
        outs, low_weights = _forward(x, weights, biases, mdtype)
        return (*outs, *low_weights)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, num_layers, mdtype, *params = inputs
        ctx.num_layers = num_layers
        ctx.mdtype = mdtype
        ctx.save_for_backward(x, *params, *output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no [N, B, H] zeros for the hidden outputs' grads

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor, *_hidden_grads) -> tuple[Tensor | None, ...]:
        num_layers = ctx.num_layers
        mdtype = ctx.mdtype
        x, *rest = ctx.saved_tensors
        weights = rest[:num_layers]
        hidden = rest[2 * num_layers : 3 * num_layers - 1]
        low_weights = rest[3 * num_layers - 1 :]  # hidden layers 1 .. L - 2, with mdtype
        needs = ctx.needs_input_grad
        need_x = needs[0]
        need_w = needs[3 : 3 + num_layers]
        need_b = needs[3 + num_layers : 3 + 2 * num_layers]
        if grad_out is None:  # only the hidden outputs were used: nothing flows back
            return (None,) * (3 + 2 * num_layers)
        pdtype = weights[0].dtype

        def low(t: Tensor) -> Tensor:  # an operand of a product below the last layer
            return t if mdtype is None else t.to(mdtype)

        grads_w: list[Tensor | None] = [None] * num_layers
        grads_b: list[Tensor | None] = [None] * num_layers
        grad_x = None
        # the layers the gradient must pass: down to the input if it needs a gradient,
        # else down to the first layer whose parameters need one
        wanted = [i for i in range(num_layers) if need_w[i] or need_b[i]]
        stop = 0 if need_x else (wanted[0] if wanted else num_layers)
        g = grad_out.contiguous()  # the last layer's: full precision; below it, in mdtype
        for i in range(num_layers - 1, stop - 1, -1):
            last = i == num_layers - 1
            if i == 0:
                if need_w[0] or need_b[0]:
                    x1 = low(_with_ones(x))
                    if x1.dim() == 2:  # shared input: g^T @ x for every member at once
                        gw1 = torch.matmul(g.transpose(-1, -2), x1)
                    else:
                        gw1 = torch.bmm(g.transpose(-1, -2), x1)
                    gw1 = gw1.to(pdtype)
                    grads_w[0] = gw1[..., :-1] if need_w[0] else None
                    grads_b[0] = gw1[..., -1] if need_b[0] else None
                if need_x:
                    gx = torch.bmm(g, low(weights[0]))
                    grad_x = gx.sum(0, dtype=x.dtype) if x.dim() == 2 else gx.to(x.dtype)
                break
            h = hidden[i - 1]  # this layer's input, after the ReLU (in mdtype if given)
            if need_w[i]:
                grads_w[i] = torch.bmm(low(g).transpose(-1, -2), h).to(pdtype)
            if need_b[i]:
                # below the last layer g is in mdtype: its sum accumulates in float32 and
                # is rounded once, as the weight gradient's product is (no float32 copy of g)
                grads_b[i] = g.sum(-2, dtype=pdtype) if last else g.sum(-2).to(pdtype)
            if i == stop:  # nothing below this layer needs a gradient
                break
            if last:
                w, g = low(weights[i]), low(g)
            else:
                w = weights[i] if mdtype is None else low_weights[i - 1]  # cast in the forward
            # [N, B, 1] x [N, 1, H] (the last layer): in full precision a broadcast product
            # beats a GEMM with an inner size of one; in 16 bits the GEMM is faster
            g = g * w if w.shape[1] == 1 and mdtype is None else torch.bmm(g, w)
            g = _relu_backward_(g, h)  # in place: g is this call's own buffer
        return (grad_x, None, None, *grads_w, *grads_b)

    @staticmethod
    def vmap(
        info, in_dims, x: Tensor, num_layers: int, mdtype: torch.dtype | None, *params: Tensor
    ):
        """Fold the vmapped dim into the ensemble: ``K`` x ``N`` members as one ensemble."""
        k = info.batch_size
        dims = in_dims[3:]

        def fold(t: Tensor, dim: int | None) -> Tensor:
            t = t.movedim(dim, 0) if dim is not None else t.expand(k, *t.shape)
            return t.reshape(k * t.shape[1], *t.shape[2:])

        flat = [fold(p, d) for p, d in zip(params, dims)]
        n = flat[0].shape[0] // k
        x_dim = in_dims[0]
        if x_dim is None:
            x_flat = x  # shared by every agent and member
        else:
            x_b = x.movedim(x_dim, 0)
            if x_b.dim() == 3:  # [K, B, d]: agent k's input, shared by its members
                x_b = x_b.unsqueeze(1).expand(k, n, *x_b.shape[1:])
            x_flat = x_b.reshape(k * n, *x_b.shape[2:])
        outs = _EnsembleReluMLP.apply(x_flat, num_layers, mdtype, *flat)
        outs = tuple(o.reshape(k, n, *o.shape[1:]) for o in outs)
        return outs, (0,) * len(outs)


# ``autograd.Function.apply`` binds its arguments to ``forward``'s signature on every call
# when ``setup_context`` is defined (as ``vmap`` requires): ``inspect.signature`` parses the
# function each time. Given once here, it is looked up instead (``benchmarks/bench_per_call.py``).
_EnsembleReluMLP.forward.__signature__ = inspect.signature(_EnsembleReluMLP.forward)
