"""Memory: peak RSS of a training process and of a 1M-transition Hopper replay buffer.

Every measurement runs in its own child process; its peak resident set size is
read from the kernel's accounting of that child (``os.wait4`` rusage,
``ru_maxrss``), so measurements do not mix.

1. Training: ``sota_scripts/sac_ens_spqr`` on Hopper-v5 for a short budget
   (default 550 frames, 500 of them random, so 51 updates and one evaluation),
   N = 10 critics of 256x256, batch 256, replay buffer of capacity 1M, with and
   without SPQR and with either storage; plus a process that only imports the
   stack and builds the environment (the fixed cost).
2. Buffer: a ``TensorDictReplayBuffer`` of 1,000,000 Hopper transitions in
   ``LazyTensorStorage`` (RAM) and ``LazyMemmapStorage`` (files), filled in
   chunks. Two layouts: "minimal" (observation, action, next observation,
   reward, done, terminated: what an update reads) and "collected" (every key
   the scripts' collector writes: policy loc/scale/log-prob, step counts,
   episode return, trajectory ids, ...). Reported: bytes per transition (sum of
   the storage's tensors / capacity), resident memory after filling (anonymous
   and file-backed), peak RSS, disk used, time to fill, time to sample a batch.

    python benchmarks/bench_memory.py                     # both parts (a few minutes)
    python benchmarks/bench_memory.py --parts buffer --capacity 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


def _proc_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def run_child(cmd: list[str], env: dict | None = None) -> tuple[int, float, float, str]:
    """Run ``cmd``; return (exit code, peak RSS in MiB from wait4, wall seconds, stdout)."""
    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fout, stderr=ferr, text=True, env=env)
        _, status, ru = os.wait4(p.pid, 0)  # reap it ourselves: rusage of this child only
        wall = time.perf_counter() - t0
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
    if rc != 0:
        sys.stderr.write(err[-3000:])
    return rc, ru.ru_maxrss * 1024 / MiB, wall, out


# ------------------------------------------------------------------ buffer child


def _template(layout: str):
    """One Hopper-v5 transition with the keys the scripts store ("collected") or an update reads."""
    import torch
    from tensordict import TensorDict

    if layout == "minimal":
        return TensorDict(
            {
                "observation": torch.zeros(11),
                "action": torch.zeros(3),
                "next": {
                    "observation": torch.zeros(11),
                    "reward": torch.zeros(1),
                    "done": torch.zeros(1, dtype=torch.bool),
                    "terminated": torch.zeros(1, dtype=torch.bool),
                },
            },
            [],
        )
    from torchrl.collectors import Collector

    from torchrl_spqr.training import builders as B

    cfg = {"env": {"name": "Hopper-v5"}, "network": {"hidden_sizes": [256, 256]}}
    env = B.make_environment(cfg, 0)
    actor = B.make_actor(cfg, env)
    coll = Collector(
        env, actor, frames_per_batch=4, total_frames=4, auto_register_policy_transforms=False
    )
    data = next(iter(coll)).reshape(-1)
    coll.shutdown()
    return data[0].clone()


def buffer_child(args) -> None:
    import torch
    from torchrl.data import LazyMemmapStorage, LazyTensorStorage, TensorDictReplayBuffer

    torch.set_num_threads(1)
    tmpl = _template(args.layout)
    base = _proc_status()
    scratch = None
    if args.storage == "lazy_memmap":
        scratch = tempfile.mkdtemp(prefix="bench_memmap_", dir=args.scratch)
        storage = LazyMemmapStorage(args.capacity, scratch_dir=scratch)
    else:
        storage = LazyTensorStorage(args.capacity)
    rb = TensorDictReplayBuffer(storage=storage, batch_size=256)
    chunk = 50_000
    t0 = time.perf_counter()
    filled = 0
    while filled < args.capacity:
        k = min(chunk, args.capacity - filled)
        block = tmpl.expand(k).clone()
        for key in ("observation", ("next", "observation")):
            block.set(key, torch.randn_like(block.get(key)))  # real values, every page touched
        rb.extend(block)
        filled += k
    fill_s = time.perf_counter() - t0
    after = _proc_status()
    t0 = time.perf_counter()
    for _ in range(50):
        rb.sample()
    sample_ms = (time.perf_counter() - t0) / 50 * 1e3
    td = storage._storage  # noqa: SLF001
    nbytes = sum(t.numel() * t.element_size() for t in td.values(True, True))
    disk = 0
    if scratch is not None:
        disk = sum(p.stat().st_size for p in Path(scratch).rglob("*") if p.is_file())
    print(
        json.dumps(
            {
                "keys": len(list(td.keys(True, True))),
                "bytes_per_transition": nbytes / args.capacity,
                "rss_before": base["VmRSS"],
                "rss_after": after["VmRSS"],
                "anon_after": after["RssAnon"],
                "file_after": after["RssFile"],
                "disk": disk,
                "fill_s": fill_s,
                "sample_ms": sample_ms,
            }
        )
    )
    if scratch is not None:
        del rb, storage, td
        shutil.rmtree(scratch, ignore_errors=True)


def baseline_child(args) -> None:
    """Imports and the environment only: the fixed cost under every training process."""
    import torch  # noqa: F401
    import torchrl  # noqa: F401

    from torchrl_spqr.training import builders as B
    from torchrl_spqr.training import online  # noqa: F401

    env = B.make_environment({"env": {"name": "Hopper-v5"}}, 0)
    env.rollout(10)
    print(json.dumps(_proc_status()))


# ------------------------------------------------------------------ parent


def training_rows(args) -> list[tuple[str, int, float, float]]:
    script = ROOT / "sota_scripts/sac_ens_spqr/sac_ens_spqr.py"
    common = [
        "env=hopper",
        f"collector.total_frames={args.frames}",
        f"collector.init_random_frames={args.random_frames}",
        "network.ensemble_size=10",
        "replay_buffer.size=1000000",
        "logger.eval_episodes=1",
        f"logger.eval_interval={args.frames}",
        f"logger.log_interval={args.frames}",
        "logger.progress=false",
        "logger.backend=none",
        f"checkpoint.interval={10 * args.frames}",
    ]
    variants = [
        ("import + env only (fixed cost)", None),
        ("sac_ens N=10, beta=1 (SPQR), lazy_tensor", ["spqr.beta=1"]),
        ("sac_ens N=10, beta=0 (baseline), lazy_tensor", ["spqr.beta=0"]),
        ("sac_ens N=10, beta=1, lazy_memmap", ["spqr.beta=1", "replay_buffer.storage=lazy_memmap"]),
    ]
    env = {**os.environ, "RL_WARNINGS": "False", "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_mem_", dir=args.scratch) as tmp:
        for i, (name, extra) in enumerate(variants):
            if extra is None:
                cmd = [sys.executable, __file__, "--child", "baseline"]
            else:
                run = Path(tmp) / f"run{i}"
                cmd = [sys.executable, str(script), *common, *extra, f"hydra.run.dir={run}"]
            rc, peak, wall, _ = run_child(cmd, env)
            rows.append((name, rc, peak, wall))
            print(f"  {name:48s} rc {rc}  peak RSS {peak:8.1f} MiB  ({wall:.0f} s)", flush=True)
    return rows


def buffer_rows(args) -> list[tuple[str, str, dict]]:
    rows = []
    for layout in ("minimal", "collected"):
        for storage in ("lazy_tensor", "lazy_memmap"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "buffer",
                "--storage",
                storage,
                "--layout",
                layout,
                "--capacity",
                str(args.capacity),
            ]
            if args.scratch:
                cmd += ["--scratch", args.scratch]
            rc, peak, _, out = run_child(cmd, {**os.environ, "RL_WARNINGS": "False"})
            if rc != 0:
                print(f"  {layout}/{storage}: failed (rc {rc})")
                continue
            res = json.loads(out.strip().splitlines()[-1])
            res["peak"] = peak * MiB
            rows.append((layout, storage, res))
            print(
                f"  {layout:9s} {storage:11s} {res['bytes_per_transition']:6.1f} B/transition, "
                f"RSS {res['rss_before'] / MiB:.0f} -> {res['rss_after'] / MiB:.0f} MiB",
                flush=True,
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", nargs="+", default=["training", "buffer"])
    p.add_argument("--frames", type=int, default=550, help="training frames per run")
    p.add_argument("--random-frames", type=int, default=500)
    p.add_argument("--capacity", type=int, default=1_000_000, help="buffer transitions")
    p.add_argument("--scratch", default=None, help="folder for memmap files and run folders")
    p.add_argument("--child", choices=["buffer", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--storage", default="lazy_tensor", help=argparse.SUPPRESS)
    p.add_argument("--layout", default="minimal", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "buffer":
        return buffer_child(args)
    if args.child == "baseline":
        return baseline_child(args)

    import torch
    import torchrl

    print(
        f"torch {torch.__version__}, torchrl {torchrl.__version__}; peak RSS = ru_maxrss of each "
        "child process (os.wait4)"
    )
    if "training" in args.parts:
        print(
            f"\n[1] training process: sac_ens_spqr on Hopper-v5, {args.frames} frames "
            f"({args.random_frames} random, {args.frames - args.random_frames + 1} updates), "
            "N=10, 256x256, batch 256, buffer capacity 1M, 1 thread"
        )
        rows = training_rows(args)
        print(f"\n{'process':48s} {'peak RSS MiB':>12s} {'wall s':>7s}")
        for name, rc, peak, wall in rows:
            flag = "" if rc == 0 else f"  (exit code {rc})"
            print(f"{name:48s} {peak:12.1f} {wall:7.0f}{flag}")
    if "buffer" in args.parts:
        print(f"\n[2] replay buffer of {args.capacity:,} Hopper-v5 transitions")
        rows = buffer_rows(args)
        print(
            f"\n{'layout':9s} {'storage':11s} {'keys':>4s} {'B/trans':>8s} {'RSS before':>10s} "
            f"{'RSS after':>9s} {'anon':>7s} {'file':>7s} {'peak':>7s} {'disk':>7s} "
            f"{'fill s':>6s} {'sample ms':>9s}   (memory in MiB)"
        )
        for layout, storage, r in rows:
            print(
                f"{layout:9s} {storage:11s} {r['keys']:4d} {r['bytes_per_transition']:8.1f} "
                f"{r['rss_before'] / MiB:10.0f} {r['rss_after'] / MiB:9.0f} "
                f"{r['anon_after'] / MiB:7.0f} {r['file_after'] / MiB:7.0f} {r['peak'] / MiB:7.0f} "
                f"{r['disk'] / MiB:7.0f} {r['fill_s']:6.1f} {r['sample_ms']:9.2f}"
            )


if __name__ == "__main__":
    main()
