"""Cost of SPQR per update: one full update with SPQR over the same update without it.

One update = loss forward, backward of the summed ``loss_*`` entries, Adam step
and soft target update, on a replay-like batch (Hopper sizes: obs 11, act 3;
256x256 critics and actor; batch 256). Variants are timed *interleaved* in one
run (round-robin, many rounds) and the ratio of medians is printed, so that
machine load affects every variant alike.

    python benchmarks/bench_spqr_overhead.py                     # N = 10, TorchRL SAC and REDQ
    python benchmarks/bench_spqr_overhead.py --bases sacn        # the package's SAC-N
    python benchmarks/bench_spqr_overhead.py --bases sacn --ensemble-sizes 3 6 10 21 55 \
        --variants bare data next_policy --rounds 5 --inner 1   # overhead against N (make bench)

At N = 21 and 55 the SPQR matrix side is d = 6 and 10; the paper density then
warns (``density="corrected"`` is recommended for N >= 15) but costs the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
from _common import ACT, OBS, make_actor, make_batch
from tensordict import TensorDict
from torchrl.objectives import SoftUpdate

from torchrl_spqr import QEnsemble, SACNLoss, SPQRLoss, make_q_member
from torchrl_spqr.objectives import EnsembleREDQLoss, EnsembleSACLoss


def make_update(base: str, n: int, hidden: int, spqr: dict | None):
    torch.manual_seed(0)
    ens = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(hidden, hidden)), n)
    actor = make_actor(hidden)
    if base == "sacn":  # the package's SAC-N (native SPQR capture, batched-matmul critics)
        inner = SACNLoss(actor, ens, target_entropy=-float(ACT))
    elif base == "sac":
        inner = EnsembleSACLoss(actor, ens.members(), num_qvalue_nets=n, loss_function="l2")
    else:
        inner = EnsembleREDQLoss(
            actor, ens.members(), num_qvalue_nets=n, sub_sample_len=2, loss_function="l2"
        )
    inner.make_value_estimator(gamma=0.99)
    loss = inner if spqr is None else SPQRLoss(inner, **spqr)
    upd = SoftUpdate(inner, tau=0.005)
    opt = torch.optim.Adam(loss.parameters(), lr=3e-4)

    def update(batch: TensorDict) -> None:
        out = loss(batch)
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        upd.step()

    return update, loss


#: short name -> (label, SPQRLoss kwargs or None for the bare loss)
VARIANTS = {
    "bare": ("bare", None),
    "data": ("SPQR data (reuse)", {"beta": 1.0, "pairs": "data"}),
    "next_policy": ("SPQR next_policy (fused)", {"beta": 1.0, "pairs": "next_policy"}),
    "no_reuse": (
        "SPQR next_policy (reuse=False)",
        {"beta": 1.0, "pairs": "next_policy", "reuse": False},
    ),
    "beta0": ("SPQR beta=0 (diagnostics only)", {"beta": 0.0, "pairs": "next_policy"}),
}


def bench(base: str, n: int, args) -> list[tuple[str, float, float, str]]:
    names = ["bare", *[v for v in args.variants if v != "bare"]]
    variants = {VARIANTS[k][0]: VARIANTS[k][1] for k in names}
    fns = {k: make_update(base, n, args.hidden, v) for k, v in variants.items()}
    batches = [make_batch(args.batch) for _ in range(8)]
    for fn, _ in fns.values():  # warm-up
        for i in range(args.warmup):
            fn(batches[i % len(batches)])
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.rounds):
        for name, (fn, _) in fns.items():
            b = batches[r % len(batches)]
            t0 = time.perf_counter()
            for _ in range(args.inner):
                fn(b)
            times[name].append((time.perf_counter() - t0) / args.inner)
    bare = statistics.median(times["bare"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        src = getattr(fns[name][1], "last_source", "-") or "-"
        paired = sorted(t / b for t, b in zip(ts, times["bare"]))  # same round, side by side
        q1, _, q3 = (
            statistics.quantiles(paired, n=4, method="inclusive") if len(paired) > 1 else paired * 3
        )
        rows.append((name, med * 1e3, med / bare, f"{q1:.2f}-{q3:.2f}", src))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ensemble-sizes", "--ns", dest="ns", type=int, nargs="+", default=[10], metavar="N"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="SPQR variants timed against the bare update (always included)",
    )
    p.add_argument("--bases", nargs="+", default=["sac", "redq"], choices=["sac", "redq", "sacn"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, "
        f"{args.hidden}x{args.hidden} critics, obs {OBS}, act {ACT}, "
        f"{args.rounds} rounds x {args.inner} updates per variant, interleaved"
    )
    print(
        "ratio: median time over the bare update's median; paired: quartiles of the per-round "
        "ratio (variant / bare in the same round)"
    )
    print(
        f"{'base':5s} {'N':>3s}  {'variant':32s} {'ms/update':>10s} {'ratio':>7s} "
        f"{'paired':>10s}  source"
    )
    for base in args.bases:
        for n in args.ns:
            for name, ms, ratio, iqr, src in bench(base, n, args):
                print(f"{base:5s} {n:3d}  {name:32s} {ms:10.2f} {ratio:7.3f} {iqr:>10s}  {src}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
