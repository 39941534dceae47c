"""Cost of the SPQR regulariser itself (:func:`torchrl_spqr.functional.spqr_kl`) on CPU.

Times one ``spqr_kl`` forward + backward (and the forward alone) on a ``[N, B]``
float32 tensor of Q-values, for several ensemble sizes N, with
``torch.utils.benchmark.Timer`` and reports medians over thousands of runs. All
rows are timed interleaved (round-robin blocks), so load on the machine affects
them alike.
With ``--compare`` it also times one vmapped forward + backward of an N=10 MLP
critic ensemble (3 x 256 hidden units, Hopper sizes: obs 11, act 3, batch 256)
in the same run, and prints the KL cost as a fraction of that critic pass.

    python benchmarks/bench_spqr_kl.py                  # 1 thread
    python benchmarks/bench_spqr_kl.py --threads 4 --compare
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from torch import nn
from torch.utils.benchmark import Timer

from torchrl_spqr.functional import spqr_kl

OBS, ACT = 11, 3


def interleaved_medians(cases: dict[str, tuple[Timer, int, int]]) -> dict[str, float]:
    """Median time per run (microseconds) of each case, timed round-robin.

    ``cases`` maps a name to ``(timer, runs, block)``: each round times one block of
    ``block`` runs of every case that still has runs left, so that machine load
    affects all cases alike; the median is taken over the blocks' per-run means.
    """
    for timer, _, block in cases.values():
        timer.timeit(max(1, block // 4))  # warm-up
    left = {name: max(1, runs // block) for name, (_, runs, block) in cases.items()}
    per_run: dict[str, list[float]] = {name: [] for name in cases}
    while any(left.values()):
        for name, (timer, _, block) in cases.items():
            if left[name]:
                per_run[name].append(timer.timeit(block).mean)
                left[name] -= 1
    return {name: statistics.median(v) * 1e6 for name, v in per_run.items()}


def kl_env(n: int, batch: int) -> dict:
    q = torch.randn(n, batch, requires_grad=True)
    return {"spqr_kl": spqr_kl, "q": q, "torch": torch}


def critic_env(n: int, batch: int, hidden: int, layers: int) -> dict:
    """A vmapped N-member MLP critic Q(s, a) -> [N, B, 1] with stacked parameters."""

    def make_member() -> nn.Module:
        dims = [OBS + ACT] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        mods.append(nn.Linear(dims[-1], 1))
        return nn.Sequential(*mods)

    members = [make_member() for _ in range(n)]
    params, buffers = torch.func.stack_module_state(members)
    base = make_member().to("meta")

    def member_forward(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))

    ensemble = torch.vmap(member_forward, in_dims=(0, 0, None))
    x = torch.cat([torch.randn(batch, OBS), torch.rand(batch, ACT) * 2 - 1], -1)
    plist = list(params.values())

    def fwd_bwd():
        q = ensemble(params, buffers, x)  # [N, B, 1]
        return torch.autograd.grad(q.sum(), plist)

    return {"fwd_bwd": fwd_bwd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ns", type=int, nargs="+", default=[3, 6, 10, 21, 55])
    parser.add_argument("--runs", type=int, default=3000, help="timed runs per KL row")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also time a vmapped 10-member 3x256 MLP critic fwd+bwd",
    )
    parser.add_argument("--critic-runs", type=int, default=300)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="SPQR")  # non-triangular / large-N notes

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, "
        f"batch {args.batch}, paper mode (ordered filling, paper density)"
    )
    ns = list(dict.fromkeys(args.ns + ([10] if args.compare else [])))
    cases: dict[str, tuple[Timer, int, int]] = {}
    for n in ns:
        env = kl_env(n, args.batch)
        cases[f"fwd{n}"] = (
            Timer("spqr_kl(q)", globals=env, num_threads=args.threads),
            args.runs,
            100,
        )
        cases[f"fb{n}"] = (
            Timer("torch.autograd.grad(spqr_kl(q), q)", globals=env, num_threads=args.threads),
            args.runs,
            100,
        )
    if args.compare:
        env = critic_env(10, args.batch, 256, 3)
        cases["critic"] = (
            Timer("fwd_bwd()", globals=env, num_threads=args.threads),
            args.critic_runs,
            10,
        )
    med = interleaved_medians(cases)

    print(f"{'N':>4} {'d':>3} {'forward [us]':>13} {'fwd+bwd [us]':>13}")
    for n in args.ns:
        d = int(((1 + 8 * n) ** 0.5 - 1) // 2)
        print(f"{n:>4} {d:>3} {med[f'fwd{n}']:>13.1f} {med[f'fb{n}']:>13.1f}")
    print(f"({args.runs} runs per KL row, median over blocks of 100)")

    if args.compare:
        critic, fb = med["critic"], med["fb10"]
        print()
        print(
            f"N=10 critic ensemble (3x256 MLP, obs {OBS} + act {ACT}, batch {args.batch}), "
            f"one vmapped fwd+bwd ({args.critic_runs} runs, median over blocks of 10):"
        )
        print(f"{'critic fwd+bwd [us]':>20} {'KL fwd+bwd [us]':>16} {'KL / critic':>12}")
        print(f"{critic:>20.1f} {fb:>16.1f} {fb / critic:>12.3f}")


if __name__ == "__main__":
    main()
