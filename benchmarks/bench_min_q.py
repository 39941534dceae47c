"""The actor's ``min_k Q_k``: the arg-min path against the plain min, side by side in one run.

The actor loss of SAC-N / SAC-Ens (and EDAC, N-critic CQL) takes the min over
the ``N`` critics of ``Q_k(s, a~pi)``. Its gradient reaches only each row's
arg-min member, so :meth:`EnsembleLossBase._min_q` can find the arg-min with a
no-grad pass and re-run each row through that member only
(``BatchedMLP.select``: rows grouped by member into padded blocks), instead of
the plain min's forward and backward through all ``N`` members. Which one is
faster depends on ``N`` and on the products' precision; this script measures
both (``loss.min_q_path = "argmin"`` / ``"full"``; same values and gradients)
and prints which one ``"auto"`` picks, so the default rule
(``ARGMIN_MIN_MEMBERS``, full-precision products only) rests on a measurement.

One update of the package's single-agent ``SACNLoss(N)`` (Hopper sizes,
256x256 critics and actor, batch 256, fused Adam, soft target update), per
``N``, per products' dtype (float32, and bfloat16 hidden products with
``critic_matmul_dtype``), per thread count; the two paths alternate
(round-robin), medians. A process that keeps freed memory, as the scripts do.
Freshly initialised critics: the rows' arg-min spreads over the members (in
training it can concentrate, and then the arg-min path falls back to the plain
min by itself).

    python benchmarks/bench_min_q.py --rounds 7 --inner 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import parse_args_keeping_freed_memory
from bench_population import batch_on_device, make_sacn, single_step

from torchrl_spqr.objectives.min_q import ARGMIN_MIN_MEMBERS

PATHS = ("argmin", "full")


def measure(n: int, mdtype, threads: int, args) -> tuple[dict[str, float], str]:
    """Median ms per update of each path, alternating; the path ``"auto"`` picks."""
    torch.set_num_threads(threads)
    loss = make_sacn(n, args.hidden, 0, matmul_dtype=mdtype)
    auto = "argmin" if loss._argmin_path_chosen(n) else "full"
    step = single_step(loss)
    data = [batch_on_device(args.batch) for _ in range(4)]
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for i in range(2):  # warm-up
        for path in PATHS:
            loss.min_q_path = path
            step(data[i])
    for r in range(args.rounds):
        for path in PATHS:
            loss.min_q_path = path
            t0 = time.perf_counter()
            for i in range(args.inner):
                step(data[(r + i) % 4])
            times[path].append((time.perf_counter() - t0) / args.inner * 1e3)
    loss.min_q_path = "auto"
    return {p: statistics.median(t) for p, t in times.items()}, auto


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ensemble-sizes", type=int, nargs="+", default=[2, 5, 10, 20, 50])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inner", type=int, default=3, help="updates per path and round")
    args = parse_args_keeping_freed_memory(p)
    print(
        f"torch {torch.__version__}; SACNLoss(N) single-agent update, {args.hidden}x"
        f"{args.hidden}, batch {args.batch}; {args.rounds} rounds x {args.inner} updates per "
        f"path, alternating, medians; ARGMIN_MIN_MEMBERS = {ARGMIN_MIN_MEMBERS}"
    )
    print(
        f"  {'products':9s} {'N':>3s} {'threads':>7s} {'argmin ms':>10s} {'full ms':>8s} "
        f"{'full/argmin':>11s} {'auto':>7s} {'auto is':>8s}"
    )
    for mdtype in (None, torch.bfloat16):
        for n in args.ensemble_sizes:
            for threads in args.threads:
                med, choice = measure(n, mdtype, threads, args)
                best = min(med, key=med.get)
                verdict = "faster" if choice == best else "slower"
                print(
                    f"  {'bfloat16' if mdtype else 'float32':9s} {n:3d} {threads:7d} "
                    f"{med['argmin']:10.2f} {med['full']:8.2f} {med['full'] / med['argmin']:10.2f}x "
                    f"{choice:>7s} {verdict:>8s}",
                    flush=True,
                )
    print(
        "  full/argmin > 1: the arg-min path is faster; 'auto is': whether the default's "
        "choice was the faster path in this run"
    )


if __name__ == "__main__":
    main()
