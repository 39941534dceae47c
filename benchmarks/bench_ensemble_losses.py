"""Update throughput of the package's ensemble losses against TorchRL and a Python-loop REDQ.

All variants are timed interleaved (round-robin) in one run and compared by the
ratio of median times. Hopper sizes (obs 11, act 3), 256x256 networks, batch
256, CPU.

    python benchmarks/bench_ensemble_losses.py redq     # REDQ N=10, M=2, G=20: env steps/s
    python benchmarks/bench_ensemble_losses.py sacn     # SAC-N N=50 updates/s vs SACLoss(50)
    python benchmarks/bench_ensemble_losses.py cql      # CQL-N N=10 vs TorchRL CQLLoss (2 critics)

- ``redq``: one environment step = G critic updates and one policy update.
  (a) TorchRL ``REDQLoss`` called G times (its actor runs every call);
  (b) the original REDQ/SPQR code style: a Python list of N critics (and N
  targets), each with its own Adam, looped over per update;
  (c) ``torchrl_spqr.objectives.ReferenceREDQLoss(policy_update_delay=G)``: the 19
  critic-only calls skip the actor entirely.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from _common import ACT, OBS, LoopEnsemble, loss_step, make_actor, make_batch
from torchrl.objectives import CQLLoss, SACLoss, SoftUpdate
from torchrl.objectives import REDQLoss as TorchRLREDQLoss

from torchrl_spqr import QEnsemble, make_q_member
from torchrl_spqr.objectives import CQLNLoss, ReferenceREDQLoss, SACNLoss

FUSED_ADAM = False  # --fused-adam: torch's fused CPU/GPU Adam kernel for every variant


def adam(params, lr: float = 3e-4) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, fused=FUSED_ADAM or None)


def redq_variants(args):
    n, m, g, h = args.n or 10, 2, args.utd, args.hidden

    def torchrl_redq():
        torch.manual_seed(0)
        ens = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(h, h)), n)
        loss = TorchRLREDQLoss(
            make_actor(h), ens.members(), num_qvalue_nets=n, sub_sample_len=m, loss_function="l2"
        )
        loss.make_value_estimator(gamma=0.99)
        return loss_step(loss, SoftUpdate(loss, tau=0.005), adam(loss.parameters()))

    def package_redq():
        torch.manual_seed(0)
        ens = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(h, h)), n)
        loss = ReferenceREDQLoss(
            make_actor(h), ens, sub_sample_len=m, policy_update_delay=g, target_entropy=-1.0
        )
        return loss_step(loss, SoftUpdate(loss, tau=0.005), adam(loss.parameters()))

    def loop_redq():
        torch.manual_seed(0)
        return LoopEnsemble(n, m, g, h, "mean", optim=adam).step

    return {
        "(a) TorchRL REDQLoss x G": torchrl_redq(),
        "(b) Python-loop REDQ (orig. style)": loop_redq(),
        "(c) torchrl_spqr ReferenceREDQLoss": package_redq(),
    }, g


def sacn_variants(args):
    n, h = args.n or 50, args.hidden

    def torchrl_sac():
        torch.manual_seed(0)
        ens = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(h, h)), n)
        loss = SACLoss(make_actor(h), ens.members(), num_qvalue_nets=n, loss_function="l2")
        loss.make_value_estimator(gamma=0.99)
        return loss_step(loss, SoftUpdate(loss, tau=0.005), adam(loss.parameters()))

    def package_sacn():
        torch.manual_seed(0)
        ens = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(h, h)), n)
        loss = SACNLoss(make_actor(h), ens, target_entropy=-3.0)
        return loss_step(loss, SoftUpdate(loss, tau=0.005), adam(loss.parameters()))

    return {
        f"TorchRL SACLoss(N={n})": torchrl_sac(),
        f"torchrl_spqr SACNLoss(N={n})": package_sacn(),
    }, 1


def cql_variants(args):
    n, h = args.n or 10, args.hidden

    def torchrl_cql():
        torch.manual_seed(0)
        ens = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(h, h, h)), 2)
        loss = CQLLoss(make_actor(h), ens.members(), loss_function="l2")
        loss.make_value_estimator(gamma=0.99)
        return loss_step(loss, SoftUpdate(loss, tau=0.005), adam(loss.parameters()))

    def package_cql():
        torch.manual_seed(0)
        ens = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(h, h, h)), n)
        loss = CQLNLoss(make_actor(h), ens, target_entropy=-3.0, lagrange_thresh=5.0)
        return loss_step(loss, SoftUpdate(loss, tau=0.005), adam(loss.parameters()))

    return {
        "TorchRL CQLLoss (N=2)": torchrl_cql(),
        f"torchrl_spqr CQLNLoss(N={n})": package_cql(),
    }, 1


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("which", choices=["redq", "sacn", "cql"])
    p.add_argument("--n", type=int, default=None, help="ensemble size (default: 10 / 50 / 10)")
    p.add_argument("--utd", type=int, default=20, help="REDQ G")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--steps", type=int, default=1, help="environment steps (REDQ) or updates per round"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fused-adam", action="store_true", help="fused Adam kernel for every variant")
    args = p.parse_args()
    global FUSED_ADAM
    FUSED_ADAM = args.fused_adam
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    variants, per_step = {"redq": redq_variants, "sacn": sacn_variants, "cql": cql_variants}[
        args.which
    ](args)
    batches = [make_batch(args.batch) for _ in range(4)]
    for fn in variants.values():  # warm-up, including one policy update for REDQ
        for i in range(per_step):
            fn(batches[i % 4])
    times = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for i in range(args.steps * per_step):
                fn(batches[(r + i) % 4])
            times[name].append((time.perf_counter() - t0) / args.steps)
    print(
        f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, hidden {args.hidden}, "
        f"{args.rounds} rounds x {args.steps} {'env steps' if per_step > 1 else 'updates'}, interleaved"
        + (", fused Adam" if args.fused_adam else ", Adam (default kernel)")
    )
    unit = "env steps/s" if per_step > 1 else "updates/s"
    meds = {k: statistics.median(v) for k, v in times.items()}
    last = list(meds)[-1]
    print(f"{'variant':40s} {unit:>12s} {'ours vs this':>13s}")
    for name, t in meds.items():
        print(f"{name:40s} {1.0 / t:12.3f} {t / meds[last]:13.2f}x")


if __name__ == "__main__":
    main()
