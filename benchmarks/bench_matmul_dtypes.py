"""Whether ``network.matmul_dtype=bfloat16`` pays on this CPU: products and whole updates.

Measured side by side in one run, on 1 and 2 torch threads (round-robin, medians):

- the ``torch.bmm`` peak in float32 and in bfloat16 over the critic layers' shapes
  (``bench_population.bmm_peak``: ``[b, 256, 256]`` products, ``b`` = 10 and 60, every
  operand layout), and their ratio;
- one update of the package's ``SACNLoss(10)`` (Hopper sizes, batch 256, 256x256, fused
  Adam, soft target update) with float32 products and with bfloat16 hidden products
  (``critic_matmul_dtype``), and their ratio;
- ``torchrl_spqr.modules.relu_mlp.matmul_slowdown(torch.bfloat16)``, the quick check the
  scripts run before they warn.

It also prints the CPU model (``/proc/cpuinfo``) and PyTorch's CPU capability. On CPUs
with AMX or AVX512-BF16 bfloat16 is the faster one; elsewhere PyTorch emulates it.

    python benchmarks/bench_matmul_dtypes.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_population import batch_on_device, bmm_peak, make_sacn, single_step  # noqa: E402

from torchrl_spqr.modules.relu_mlp import matmul_slowdown  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    print(f"matmul_slowdown(bfloat16) = {matmul_slowdown(torch.bfloat16):.1f}")
    print("\n| threads | fp32 bmm peak | bf16 bmm peak | bf16 / fp32 speed | SACNLoss(10) update "
          "fp32 | with bf16 products | bf16 / fp32 update speed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        steps = {
            "fp32": single_step(make_sacn(10, 256, seed=0)),
            "bf16": single_step(make_sacn(10, 256, seed=0, matmul_dtype=torch.bfloat16)),
        }
        data = [batch_on_device(256) for _ in range(4)]
        for step in steps.values():  # warm-up
            step(data[0])
        peaks = {"fp32": [], "bf16": []}
        times = {"fp32": [], "bf16": []}
        for r in range(args.rounds):
            peaks["fp32"].append(bmm_peak(1, torch.float32))
            peaks["bf16"].append(bmm_peak(1, torch.bfloat16))
            for name, step in steps.items():
                t0 = time.perf_counter()
                step(data[r % 4])
                times[name].append(time.perf_counter() - t0)
        pk = {k: statistics.median(v) for k, v in peaks.items()}
        tm = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"| {threads} | {pk['fp32']:.1f} GFLOP/s | {pk['bf16']:.1f} GFLOP/s "
            f"| {pk['bf16'] / pk['fp32']:.3f}x | {1e3 * tm['fp32']:.1f} ms "
            f"| {1e3 * tm['bf16']:.1f} ms | {tm['fp32'] / tm['bf16']:.3f}x |"
        )


if __name__ == "__main__":
    main()
