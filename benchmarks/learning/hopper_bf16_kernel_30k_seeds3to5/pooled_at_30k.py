"""Seeds 3-5 of the bfloat16 kernel's 30k learning check, and seeds 0-5 pooled.

``../hopper_bf16_kernel_30k`` ran beta 0 and beta 1 (dataset pairs) with seeds 0-2;
this folder's runs are the same settings with seeds 3-5. Prints, per arm, the
evaluation return at 30k steps ("final at 30k") and the best evaluation up to
30k, mean +- sd over seeds 3-5 and over seeds 0-5, and SPQR's effect (beta 1
minus beta 0, paired by seed) with its 95% Student-t interval, for both seed
sets. The runs are read, and the differences printed, with ``compare_at_30k.py``'s
``read`` and ``paired_line``.

    python benchmarks/learning/hopper_bf16_kernel_30k_seeds3to5/pooled_at_30k.py
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIRST = HERE.parent / "hopper_bf16_kernel_30k"
ARMS = {"beta 0": "beta0.0_N10_seed{s}", "beta 1 (data pairs)": "beta1.0_N10_seed{s}"}
SEED_SETS = {"seeds 3-5": range(3, 6), "seeds 0-5": range(6)}


@functools.cache
def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_at_30k", FIRST / "compare_at_30k.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def results() -> dict[str, dict[int, tuple[float, float]]]:
    """arm -> seed -> (final at 30k, best up to 30k), seeds 0-5."""
    read = _compare_module().read
    return {
        arm: {s: read((FIRST if s < 3 else HERE) / "arms" / p.format(s=s)) for s in range(6)}
        for arm, p in ARMS.items()
    }


def main() -> None:
    res = results()
    print("Hopper-v5 SAC-Ens N = 10, bfloat16 products, at 30k steps (mean +- sd over seeds)")
    print("| arm | seeds | final at 30k | best up to 30k | per seed, final |")
    print("|---|---|---|---|---|")
    for arm, runs in res.items():
        for label, seeds in SEED_SETS.items():
            final = [runs[s][0] for s in seeds]
            best = [runs[s][1] for s in seeds]
            print(
                f"| {arm} | {label} | {statistics.mean(final):.1f} +- {statistics.stdev(final):.1f} "
                f"| {statistics.mean(best):.1f} +- {statistics.stdev(best):.1f} "
                f"| {', '.join(f'{v:.1f}' for v in final)} |"
            )
    print("\nSPQR's effect, beta 1 minus beta 0, final return at 30k, paired by seed:")
    b0, b1 = (res[a] for a in ARMS)
    paired_line = _compare_module().paired_line
    for label, seeds in SEED_SETS.items():
        print(paired_line(label, [b1[s][0] - b0[s][0] for s in seeds]))


if __name__ == "__main__":
    main()
