"""What each part of the bfloat16 critic kernel buys, measured side by side in one run.

``network.matmul_dtype=bfloat16`` (``docs/speed.md``) runs the critics' hidden
products in bfloat16 (``torchrl_spqr.modules.relu_mlp``). Two of the kernel's
parts exist only for speed, and this script turns each off in turn, by
swapping the module's function for the plain PyTorch way of doing the same:

* ``bit ReLU``: the ReLU and its backward on the ``int16`` view of the bits
  (``_relu_``, ``_relu_backward_``); off: ``torch.relu_`` and
  ``threshold_backward`` on the bfloat16 tensors, which PyTorch's CPU kernels
  compute by converting every element to float32 and back;
* ``last layer from bf16``: the last layer from the bfloat16 activation with
  two split-weight products (``_last_layer_from_bf16``); off: a float32 copy
  of the activation, then a float32 product.

Variants (all with bfloat16 products): the kernel as it is, each part off,
both off; the float32 update for reference. One update of a ``K``-agent
SAC-Ens population (``PopulationUpdate``, N = 10, Hopper sizes, batch 256,
fused Adam, soft target update), round-robin over the variants, medians, on
each ``--threads`` count, in a process that keeps freed memory (as the
scripts do). The roofline column counts the float32-equivalent work
(``bench_population.py``'s formula) against the float32 ``bmm`` peak measured
in the same run: a speed ratio for the bfloat16 rows, not an efficiency.

With ``--ops``, first the passes themselves: the ReLU and its backward on a
``[60, 256, 256]`` bfloat16 tensor, PyTorch's kernels against the bit
kernel's, each over a rotation of 24 tensors (about 380 MB, so that the
operands come from memory as in an update), medians of the per-call time.

    python benchmarks/bench_bf16_kernel.py --rounds 9 --inner 3 --ops
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from bench_population import (
    batch_on_device,
    bmm_peak,
    make_population,
    update_flops,
)

import torchrl_spqr.modules.relu_mlp as relu_mlp
from torchrl_spqr.training.malloc import retain_freed_memory


def plain_relu_(h: torch.Tensor) -> torch.Tensor:
    return torch.relu_(h)


def plain_relu_backward_(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.threshold_backward.grad_input(g, h, 0.0, grad_input=g)


def last_layer_via_float32(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(h.to(w.dtype), w.transpose(-1, -2)).add_(b.unsqueeze(-2))


KERNEL = {
    "_relu_": relu_mlp._relu_,
    "_relu_backward_": relu_mlp._relu_backward_,
    "_last_layer_from_bf16": relu_mlp._last_layer_from_bf16,
}
PLAIN = {
    "bit ReLU": {"_relu_": plain_relu_, "_relu_backward_": plain_relu_backward_},
    "last layer from bf16": {"_last_layer_from_bf16": last_layer_via_float32},
}


def with_parts_off(fn: Callable, off: list[str]) -> Callable:
    """``fn`` with the named kernel parts swapped for the plain way, for its call only."""
    swap = {name: f for part in off for name, f in PLAIN[part].items()}

    def step(batch):
        for name, f in swap.items():
            setattr(relu_mlp, name, f)
        try:
            return fn(batch)
        finally:
            for name in swap:
                setattr(relu_mlp, name, KERNEL[name])

    return step


def op_passes(threads: int, rounds: int) -> None:
    """``--ops``: PyTorch's bfloat16 ReLU passes against the bit kernel's, side by side."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    h = [torch.randn(60, 256, 256, generator=gen).to(torch.bfloat16) for _ in range(24)]
    g = [torch.randn(60, 256, 256, generator=gen).to(torch.bfloat16) for _ in range(24)]
    passes = {
        "ReLU, torch.relu_": lambda i: plain_relu_(h[i]),
        "ReLU, bit kernel": lambda i: relu_mlp._relu_(h[i]),
        "ReLU backward, threshold_backward": lambda i: plain_relu_backward_(g[i], h[i - 1]),
        "ReLU backward, bit kernel": lambda i: relu_mlp._relu_backward_(g[i], h[i - 1]),
    }
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(rounds):
        for name, f in passes.items():
            for i in range(len(h)):
                t0 = time.perf_counter()
                f(i)
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n[{threads} thread(s)] one pass over [60, 256, 256] bfloat16 (median ms per call)")
    for plain, bits in [(0, 1), (2, 3)]:
        a, b = list(med)[plain], list(med)[bits]
        print(
            f"  {a:36s} {1e3 * med[a]:6.2f}   {b:28s} {1e3 * med[b]:6.2f}   "
            f"bit kernel {med[a] / med[b]:.1f}x faster"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--agents", type=int, default=6, help="K (default 6)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--inner", type=int, default=3, help="updates per variant and round")
    p.add_argument("--ops", action="store_true", help="first, the ReLU passes alone")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if not retain_freed_memory():
        print("(glibc's mallopt unavailable: running with this malloc's defaults)")
    k, n, h, b = args.agents, 10, 256, 256
    work = k * update_flops(n, h, b)
    print(
        f"torch {torch.__version__}; K={k} population update, N={n}, {h}x{h}, batch {b}; "
        f"{args.rounds} rounds x {args.inner} updates, round-robin, medians"
    )
    if args.ops:
        for threads in args.threads:
            op_passes(threads, args.rounds)
    bf = torch.bfloat16
    for threads in args.threads:
        torch.set_num_threads(threads)

        def population(mdtype):
            return make_population(k, n, h, mdtype)

        variants = {
            "bf16 kernel as it is": population(bf),
            "bf16, bit ReLU off": with_parts_off(population(bf), ["bit ReLU"]),
            "bf16, last layer from bf16 off": with_parts_off(
                population(bf), ["last layer from bf16"]
            ),
            "bf16, both off": with_parts_off(population(bf), list(PLAIN)),
            "float32 (reference)": population(None),
        }
        data = [torch.stack([batch_on_device(b) for _ in range(k)]) for _ in range(2)]
        times: dict[str, list[float]] = {name: [] for name in variants}
        peaks = []
        for r in range(args.rounds + 1):
            for name, fn in variants.items():
                fn(data[0].clone())
                t0 = time.perf_counter()
                for i in range(args.inner):
                    fn(data[i % 2].clone())
                if r:  # round 0 warms up
                    times[name].append((time.perf_counter() - t0) / args.inner)
            if r:
                peaks.append(bmm_peak(1))
        peak = statistics.median(peaks)
        med = {name: statistics.median(t) for name, t in times.items()}
        base = med["bf16 kernel as it is"]
        print(f"\n[{threads} thread(s)] fp32 bmm peak {peak:.1f} GFLOP/s")
        print(f"  {'variant':34s} {'ms/update':>10s} {'roofline':>9s} {'kernel speed-up':>16s}")
        for name, t in med.items():
            print(
                f"  {name:34s} {1e3 * t:10.1f} {100 * work / t / (peak * 1e9):8.1f}% "
                f"{t / base:15.2f}x"
            )


if __name__ == "__main__":
    main()
