"""Update throughput of ensemble critics at equal work: TorchRL, a Python loop, torchrl_spqr.

Three implementations of the same algorithm, timed interleaved (round-robin) in one
run and compared by the ratio of median times (Hopper sizes: obs 11, act 3; 256x256
critics and actor; batch 256; CPU):

- TorchRL's loss: ``SACLoss(num_qvalue_nets=N)`` for SAC-N, ``REDQLoss`` for REDQ
  (vmapped functional critics; REDQLoss runs its actor loss at every call);
- the original REDQ / SPQR code style: a Python list of N critic modules (and N
  targets), each with its own Adam optimiser, looped over at every update;
- the package's vectorised path: ``SACNLoss`` / ``ReferenceREDQLoss(policy_update_delay=G)``
  (stacked parameters, batched matrix products).

Work per unit: SAC-N: one update (N critics, actor, temperature, soft target
update); REDQ (N=10, M=2, G=20): one environment step = G critic updates and one
policy update. ``--spqr`` adds the SPQR term (beta=1, on ``Q_k(s', a'~pi)``) to
every implementation: ``SPQRLoss`` around the two losses, ``spqr_kl`` over the
loop's critics (N extra critic passes, as the authors' code does).

    python benchmarks/bench_throughput.py                        # SAC-N N=10, REDQ N=10 G=20
    python benchmarks/bench_throughput.py --spqr                 # same with SPQR in every variant
    python benchmarks/bench_throughput.py --algos sacn --ensemble-sizes 10 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
from _common import ACT, OBS, LoopEnsemble, loss_step, make_actor, make_batch
from torchrl.objectives import REDQLoss as TorchRLREDQLoss
from torchrl.objectives import SACLoss, SoftUpdate

from torchrl_spqr import QEnsemble, SPQRLoss, make_q_member
from torchrl_spqr.objectives import ReferenceREDQLoss, SACNLoss


def _wrap(inner, spqr: bool):
    loss = SPQRLoss(inner, beta=1.0, pairs="next_policy") if spqr else inner
    return loss_step(
        loss, SoftUpdate(inner, tau=0.005), torch.optim.Adam(loss.parameters(), lr=3e-4)
    )


def _ensemble(n: int, h: int) -> QEnsemble:
    return QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(h, h)), n)


def sacn_variants(n: int, h: int, spqr: bool):
    def torchrl():
        torch.manual_seed(0)
        loss = SACLoss(
            make_actor(h), _ensemble(n, h).members(), num_qvalue_nets=n, loss_function="l2"
        )
        loss.make_value_estimator(gamma=0.99)
        return _wrap(loss, spqr)

    def loop():
        torch.manual_seed(0)
        return LoopEnsemble(n, n, 1, h, "min", 1.0 if spqr else 0.0).step

    def ours():
        torch.manual_seed(0)
        return _wrap(SACNLoss(make_actor(h), _ensemble(n, h), target_entropy=-float(ACT)), spqr)

    return {
        "TorchRL SACLoss(num_qvalue_nets=N)": torchrl(),
        "Python loop (orig. REDQ/SPQR style)": loop(),
        "torchrl_spqr SACNLoss": ours(),
    }, 1


def redq_variants(n: int, h: int, spqr: bool, m: int = 2, g: int = 20):
    def torchrl():
        torch.manual_seed(0)
        loss = TorchRLREDQLoss(
            make_actor(h),
            _ensemble(n, h).members(),
            num_qvalue_nets=n,
            sub_sample_len=m,
            loss_function="l2",
        )
        loss.make_value_estimator(gamma=0.99)
        return _wrap(loss, spqr)

    def loop():
        torch.manual_seed(0)
        return LoopEnsemble(n, m, g, h, "mean", 1.0 if spqr else 0.0).step

    def ours():
        torch.manual_seed(0)
        loss = ReferenceREDQLoss(
            make_actor(h),
            _ensemble(n, h),
            sub_sample_len=m,
            policy_update_delay=g,
            target_entropy=-float(ACT),
        )
        return _wrap(loss, spqr)

    return {
        "TorchRL REDQLoss x G": torchrl(),
        "Python loop (orig. REDQ/SPQR style)": loop(),
        "torchrl_spqr ReferenceREDQLoss(policy_update_delay=G)": ours(),
    }, g


def run_case(variants: dict, per_unit: int, args) -> dict[str, float]:
    """Median seconds per unit (update or env step) of each variant, timed round-robin."""
    batches = [make_batch(args.batch) for _ in range(4)]
    for fn in variants.values():  # warm-up: one unit (REDQ: includes a policy update)
        for i in range(per_unit):
            fn(batches[i % 4])
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for i in range(args.units * per_unit):
                fn(batches[(r + i) % 4])
            times[name].append((time.perf_counter() - t0) / args.units)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--algos", nargs="+", default=["sacn", "redq"], choices=["sacn", "redq"])
    p.add_argument("--ensemble-sizes", type=int, nargs="+", default=[10], metavar="N")
    p.add_argument("--utd", type=int, default=20, help="REDQ G (critic updates per env step)")
    p.add_argument("--spqr", action="store_true", help="SPQR term (beta=1) in every variant")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--units", type=int, default=2, help="updates (SAC-N) or env steps per round")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, "
        f"{args.hidden}x{args.hidden} networks, obs {OBS}, act {ACT}, SPQR {'on' if args.spqr else 'off'}, "
        f"{args.rounds} rounds x {args.units} units per variant, interleaved, median"
    )
    print(
        f"{'algo':5s} {'N':>3s}  {'implementation':46s} {'unit':>9s} {'units/s':>8s} "
        f"{'ms/unit':>9s} {'ours faster by':>14s}"
    )
    for algo in args.algos:
        for n in args.ensemble_sizes:
            if algo == "sacn":
                variants, per_unit = sacn_variants(n, args.hidden, args.spqr)
                unit = "update"
            else:
                variants, per_unit = redq_variants(n, args.hidden, args.spqr, g=args.utd)
                unit = "env step"
            meds = run_case(variants, per_unit, args)
            ours = meds[list(meds)[-1]]
            for name, t in meds.items():
                print(
                    f"{algo:5s} {n:3d}  {name:46s} {unit:>9s} {1 / t:8.3f} {1e3 * t:9.1f} "
                    f"{t / ours:13.2f}x"
                )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
