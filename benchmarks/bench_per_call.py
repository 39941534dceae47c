"""Two per-call costs of the libraries in one SAC update, with and without them.

1. ``autograd.Function.apply`` (torch 2.13) binds its arguments to ``forward``'s signature
   on every call when the Function defines ``setup_context``, which ``vmap`` requires:
   ``inspect.signature(forward)`` parses the function each time. The fused critic kernel
   (``torchrl_spqr.modules.relu_mlp._EnsembleReluMLP``) gives its signature once
   (``forward.__signature__``), so the lookup returns it.
2. Every ``TensorDictModule`` writes each output through ``TensorDict.from_any(tensor)``
   (tensordict 0.14). For a plain tensor, ``from_any`` calls
   ``importlib.util.find_spec("pandas")`` before returning the tensor unchanged; without
   pandas installed that searches every ``sys.path`` entry, on each call. A policy sample
   writes two outputs (``loc``, ``scale``) and a SAC update samples twice: four searches
   per update. The package does not change tensordict; here the answer is cached in this
   process only (``find_spec("pandas")`` answered once, as tensordict checks ``h5py``
   once at import), to measure what a fix upstream would give.

Variants, alternating (round-robin), medians, in one process:

- ``stock``: both costs paid (the kernel's signature given back to ``inspect``);
- ``package``: the kernel's signature given (what the package ships);
- ``both``: the package, and the pandas lookup cached.

Cases: one ``TensorDict.from_any(tensor)`` call (microseconds); the package's
single-agent ``SACNLoss(10)`` update with bfloat16 hidden products (fused Adam, soft
target update) at Hopper sizes (256x256, batch 256) and at hidden width and batch 8 (its
fixed cost, as ``bench_population.py --overhead``); a ``K = 3`` population update
(``PopulationUpdate``, the kernel under ``vmap``) at width and batch 8; on 1 and 2 threads.

    python benchmarks/bench_per_call.py --rounds 9
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import sys
import time

import torch
from _common import parse_args_keeping_freed_memory
from bench_population import TINY, batch_on_device, make_population, make_sacn, single_step
from tensordict import TensorDict

from torchrl_spqr.modules.relu_mlp import _EnsembleReluMLP

_FIND_SPEC = importlib.util.find_spec
_SIGNATURE = inspect.signature(_EnsembleReluMLP.forward)
_ANSWERS: dict[str, object] = {}
VARIANTS = ("stock", "package", "both")


def _cached_find_spec(name, package=None):
    if name != "pandas":
        return _FIND_SPEC(name, package)
    if name not in _ANSWERS:
        _ANSWERS[name] = _FIND_SPEC(name, package)
    return _ANSWERS[name]


def _use(variant: str) -> None:
    importlib.util.find_spec = _cached_find_spec if variant == "both" else _FIND_SPEC
    if variant == "stock":
        if "__signature__" in vars(_EnsembleReluMLP.forward):
            del _EnsembleReluMLP.forward.__signature__
    else:
        _EnsembleReluMLP.forward.__signature__ = _SIGNATURE


def _cycle(step, data):
    it = iter(range(10**12))
    return lambda: step(data[next(it) % len(data)])


def cases() -> dict[str, tuple]:
    """Case -> (call, calls per timing, scale of the printed time)."""
    x = torch.zeros(3)
    out = {"from_any(tensor), us": (lambda: TensorDict.from_any(x), 200, 1e6)}
    for label, size, inner in (("width, batch 8", TINY, 20), ("256x256, batch 256", 256, 3)):
        step = single_step(make_sacn(10, size, 0, matmul_dtype=torch.bfloat16))
        out[f"single agent, {label}, ms"] = (
            _cycle(step, [batch_on_device(size) for _ in range(4)]),
            inner,
            1e3,
        )
    pop = make_population(3, 10, TINY, torch.bfloat16)
    data = [torch.stack([batch_on_device(TINY) for _ in range(3)]) for _ in range(4)]
    out["population K = 3, width, batch 8, ms"] = (_cycle(pop, data), 10, 1e3)
    return out


def measure(threads: int, rounds: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(threads)
    todo = cases()
    times = {c: {v: [] for v in VARIANTS} for c in todo}
    for r in range(rounds + 1):  # round 0 warms up
        for case, (fn, inner, scale) in todo.items():
            for variant in VARIANTS:
                _use(variant)
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                if r:
                    times[case][variant].append((time.perf_counter() - t0) / inner * scale)
    _use("package")
    return {c: {v: statistics.median(t) for v, t in vs.items()} for c, vs in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=9)
    args = parse_args_keeping_freed_memory(p)
    import tensordict

    print(
        f"torch {torch.__version__}, tensordict {tensordict.__version__}, Python "
        f"{sys.version.split()[0]}; pandas installed: {_FIND_SPEC('pandas') is not None}; "
        f"{len(sys.path)} sys.path entries; {args.rounds} rounds, medians"
    )
    print(
        f"  {'case':40s} {'threads':>7s} {'stock':>8s} {'package':>8s} {'both':>8s} "
        f"{'stock/package':>13s} {'stock/both':>10s}"
    )
    for threads in args.threads:
        for case, t in measure(threads, args.rounds).items():
            print(
                f"  {case:40s} {threads:7d} {t['stock']:8.2f} {t['package']:8.2f} "
                f"{t['both']:8.2f} {t['stock'] / t['package']:13.3f} "
                f"{t['stock'] / t['both']:10.3f}"
            )


if __name__ == "__main__":
    main()
