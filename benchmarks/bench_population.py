"""Population training (issue 19, item 2): roofline fractions and aggregate throughput.

Everything is measured side by side in one run (round-robin, medians):

(a) the fp32 ``torch.bmm`` peak of this machine: the best GFLOP/s over
    ``[b, 256, 256] @ [b, 256, 256]`` products (``b`` = 10 and 60, the critic
    layers' batch of one agent and of six; every operand layout), measured in
    every round between the updates, median over the rounds;
(b) the useful work of one SAC update, counted as 6 passes of the N-critic
    ensemble plus 3 of the actor (forward, backward to the inputs and to the
    weights of the critic at the data pairs: 3 passes; the target's forward:
    1; the actor loss's critic forward and backward: 2; the actor's forward at
    s and s' and its backward: 3), matmul FLOPs only::

        mlp(sizes)  = 2 * sum(a * b for consecutive layer sizes a, b)
        critic      = mlp([obs + act, H, H, 1]),  actor = mlp([obs, H, H, 2 * act])
        work/update = B * (6 * N * critic + 3 * actor)

    (Hopper: obs 11, act 3; H = 256, B = 256, N = 10: 2.24 GFLOP);
(c) the roofline fraction ``work / time / peak`` of one update of the
    package's ``SACNLoss(N)`` (single agent), TorchRL's
    ``SACLoss(num_qvalue_nets=N)`` and a ``K``-agent
    :class:`~torchrl_spqr.training.population.PopulationUpdate` (work ``K``
    times one update), each with fused Adam and a soft target update, on
    every ``--threads`` count; the package's single agent and population also
    with their critics run op by op (``BatchedMLP.use_fused_kernel = False``),
    for what the fused ReLU-MLP kernel (``modules/relu_mlp.py``) gains;
(d) aggregate agent-updates per second of ``K`` agents on all the cores,
    three ways (``multiprocessing``, spawn): the population in one process
    with one torch thread per core; the population split into one process per
    core (``K / cores`` agents each, 1 thread each: 2 processes x 3 agents on
    2 cores); ``K`` single-agent processes with 1 thread each, as the seeds of
    a sweep run today. All processes start first and stay alive; in each round
    the three configurations run one after another, each alone, their
    processes started together by a barrier; a configuration's rate is
    ``K * updates / (time until its last process finishes)``.

(f) with ``--bf16``: the package's single agent and the population with their
    critics' hidden products in bfloat16 (``critic_matmul_dtype``; the output,
    parameters and gradients stay float32), their work counted as above and
    against the same fp32 peak (a ratio of speed, not an efficiency: the bf16
    ``bmm`` peak, printed too, is several times the fp32 one on CPUs with AMX);
(g) with ``--malloc``: glibc's malloc keeping freed memory
    (:func:`torchrl_spqr.training.malloc.retain_freed_memory`) against its
    defaults, two processes alive side by side, each running the package's
    single agent and population (and their bf16 versions with ``--bf16``) alone
    in its turn, round-robin. ``--retain-freed-memory`` applies the setting to
    (a)-(c) as well.
(h) with ``--overhead``: how far 2 threads can take an update, from two
    measurements side by side: each update at full size and the same update
    with hidden width and batch 8 (the same operators, almost no arithmetic:
    its time is the update's fixed cost, Python, dispatch and the operators'
    own overheads), both on 1 and on 2 threads. If everything but the fixed
    cost scaled perfectly, 2 threads would take ``F2 + (T1 - F1) / 2``
    (``T``: full size, ``F``: fixed cost, by thread count); the script prints
    that bound's roofline fraction next to the measured one, and the fixed
    cost an update could have at most for issue 19's 2-thread targets
    (65% single agent, 80% population) under perfect scaling.

    python benchmarks/bench_population.py --rounds 5 --inner 2 --updates 4 --spqr --breakdown
    python benchmarks/bench_population.py --device cuda --threads 1 --agents 8 --compile --cudagraphs

Absolute times depend on the machine's load; the fractions and ratios are
computed from timings taken in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from _common import ACT, OBS, make_actor, make_batch
from tensordict import TensorDict
from torchrl.objectives import SACLoss, SoftUpdate

from torchrl_spqr import QEnsemble, SACNLoss, SPQRLoss, make_q_member
from torchrl_spqr.modules import BatchedMLP
from torchrl_spqr.training.malloc import retain_freed_memory
from torchrl_spqr.training.population import PopulationUpdate

DEVICE = torch.device("cpu")  # --device


def sync() -> None:
    """Wait for the device's queued work (CUDA timings)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def batch_on_device(b: int) -> TensorDict:
    return make_batch(b).to(DEVICE)


def mlp_flops(sizes: list[int]) -> int:
    """Matmul FLOPs of one sample through an MLP with these layer sizes (2 per multiply-add)."""
    return 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def update_flops(n: int, hidden: int, batch: int) -> int:
    """Useful work of one SAC update: 6 passes of the N-critic ensemble + 3 of the actor."""
    critic = mlp_flops([OBS + ACT, hidden, hidden, 1])
    actor = mlp_flops([OBS, hidden, hidden, 2 * ACT])
    return batch * (6 * n * critic + 3 * actor)


def make_sacn(n: int, hidden: int, seed: int, beta: float | None = None, matmul_dtype=None):
    torch.manual_seed(seed)
    ens = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(hidden, hidden)), n)
    loss = SACNLoss(make_actor(hidden), ens)
    loss.critic_matmul_dtype = matmul_dtype
    if beta is not None:
        loss = SPQRLoss(loss, beta=beta, diagnostics_interval=0)
    return loss.to(DEVICE)


def single_step(loss):
    """The usual TorchRL update: sum the loss_* entries, backward, fused Adam, SoftUpdate."""
    opt = torch.optim.Adam(loss.parameters(), lr=3e-4, fused=True)
    updater = SoftUpdate(loss, tau=0.005)

    def step(batch: TensorDict) -> None:
        out = loss(batch)
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        updater.step()

    return step


def make_population(
    k: int, n: int, hidden: int, matmul_dtype=None, seed: int = 0, **fast
) -> PopulationUpdate:
    """``k`` ``SACNLoss(n)`` agents (seeds ``seed`` to ``seed + k - 1``) as one population."""
    agents = [make_sacn(n, hidden, seed + s, matmul_dtype=matmul_dtype) for s in range(k)]
    return PopulationUpdate(agents, randomness="different", **fast)


def product_dtypes(args) -> list[torch.dtype | None]:
    """The critics' hidden-product dtypes measured: float32 (``None``), and bfloat16 with --bf16."""
    return [None] + ([torch.bfloat16] if args.bf16 else [])


def op_by_op(fn: Callable[[TensorDict], object]) -> Callable[[TensorDict], object]:
    """``fn`` with the critics run op by op (``BatchedMLP.use_fused_kernel = False``)."""

    def step(batch: TensorDict) -> object:
        BatchedMLP.use_fused_kernel = False
        try:
            return fn(batch)
        finally:
            BatchedMLP.use_fused_kernel = True

    step.population = isinstance(fn, PopulationUpdate)
    return step


def is_population(fn: Callable) -> bool:
    return isinstance(fn, PopulationUpdate) or getattr(fn, "population", False)


def make_variants(args) -> dict[str, tuple[Callable[[TensorDict], object], int]]:
    """name -> (update function, agents per call)."""
    n, h, k = args.n, args.hidden, args.agents
    torch.manual_seed(0)
    ens = QEnsemble(lambda: make_q_member(OBS + ACT, num_cells=(h, h)), n)
    sac = SACLoss(make_actor(h), ens.members(), num_qvalue_nets=n, loss_function="l2")
    sac.make_value_estimator(gamma=0.99)
    sac = sac.to(DEVICE)
    fast = {"compile": args.compile, "cudagraphs": args.cudagraphs}
    variants = {
        f"TorchRL SACLoss({n})": (single_step(sac), 1),
        f"SACNLoss({n}), single agent": (single_step(make_sacn(n, h, 0)), 1),
        f"SACNLoss({n}), single agent, op-by-op": (op_by_op(single_step(make_sacn(n, h, 0))), 1),
        f"SACNLoss({n}), PopulationUpdate K=1": (
            PopulationUpdate([make_sacn(n, h, 0)], **fast),
            1,
        ),
    }
    variants[f"population K={k} SACNLoss({n})"] = (make_population(k, n, h, **fast), k)
    variants[f"population K={k}, op-by-op"] = (op_by_op(make_population(k, n, h, **fast)), k)
    if args.spqr:
        betas = [float(i % 2) for i in range(k)]
        pop_spqr = PopulationUpdate(
            [make_sacn(n, h, s, beta=b) for s, b in enumerate(betas)],
            randomness="different",
            **fast,
        )
        variants[f"population K={k} + SPQR (beta 0/1)"] = (pop_spqr, k)
    if args.bf16:
        variants.update(bf16_variants(args, fast))
    if args.compile or args.cudagraphs:  # the same populations eager, side by side
        for mdtype in product_dtypes(args):
            tag = ", bf16 products" if mdtype is not None else ""
            variants[f"population K={k}{tag}, eager"] = (make_population(k, n, h, mdtype), k)
    return variants


def bf16_variants(args, fast=None) -> dict[str, tuple[Callable[[TensorDict], object], int]]:
    """(f): the single agent and the population with bfloat16 hidden products."""
    n, h, k, bf = args.n, args.hidden, args.agents, torch.bfloat16
    pop = make_population(k, n, h, bf, **(fast or {}))
    return {
        f"SACNLoss({n}), single agent, bf16 products": (
            single_step(make_sacn(n, h, 0, matmul_dtype=bf)),
            1,
        ),
        f"population K={k}, bf16 products": (pop, k),
    }


def bmm_peak(rounds: int, dtype: torch.dtype = torch.float32) -> float:
    """Best median GFLOP/s of ``torch.bmm`` in ``dtype`` over the critic layers' shapes and layouts.

    ``[b, 256, 256] @ [b, 256, 256]`` with ``b`` = 10 (one agent's ensemble)
    and 60 (six agents'), each operand plain or transposed (the forward and
    the two backward products use all of these).
    """
    best = 0.0
    for b in (10, 60):
        x = torch.randn(b, 256, 256, device=DEVICE, dtype=dtype)
        w = torch.randn(b, 256, 256, device=DEVICE, dtype=dtype)
        flops = 2 * b * 256**3
        reps = max(1, int((2e11 if DEVICE.type == "cuda" else 2e9) / flops))
        for xt, wt in ((False, False), (False, True), (True, False), (True, True)):
            a = x.transpose(1, 2) if xt else x
            c = w.transpose(1, 2) if wt else w
            torch.bmm(a, c)
            times = []
            for _ in range(rounds):
                sync()
                t0 = time.perf_counter()
                for _ in range(reps):
                    torch.bmm(a, c)
                sync()
                times.append((time.perf_counter() - t0) / reps)
            best = max(best, flops / statistics.median(times) / 1e9)
    return best


def roofline(args, threads: int) -> tuple[float, dict[str, float], dict[str, int], float]:
    """bmm peak, median seconds per update, agents per call of each variant, bf16 peak."""
    torch.set_num_threads(threads)
    variants = make_variants(args)
    single = [batch_on_device(args.batch) for _ in range(4)]
    stacked = [
        torch.stack([batch_on_device(args.batch) for _ in range(args.agents)]) for _ in range(4)
    ]

    own: dict[int, list[TensorDict]] = {}

    def data_of(fn: Callable, k: int) -> list[TensorDict]:
        """The variant's own copies of the batches: the losses write entries into their
        input (``td_error`` and others), and a CUDA-graph capture refuses an input that
        carries gradients from another variant's graph (the first H200 run stopped there)."""
        if id(fn) not in own:
            if not is_population(fn):
                base = single
            else:
                base = stacked if k > 1 else [b.unsqueeze(0) for b in single]
            own[id(fn)] = [b.clone() for b in base]
        return own[id(fn)]

    for fn, k in variants.values():  # warm-up (and compilation / CUDA-graph capture)
        for i in range(8 if args.compile or args.cudagraphs else 2):
            fn(data_of(fn, k)[i % 4])
    times = {name: [] for name in variants}
    peaks, bf16_peaks = [], []
    for r in range(args.rounds):
        peaks.append(bmm_peak(3))
        if args.bf16:
            bf16_peaks.append(bmm_peak(3, torch.bfloat16))  # reference: (f) counts against fp32
        for name, (fn, k) in variants.items():
            data = data_of(fn, k)
            sync()
            t0 = time.perf_counter()
            for i in range(args.inner):
                fn(data[(r + i) % 4])
            sync()
            times[name].append((time.perf_counter() - t0) / args.inner)
    return (
        statistics.median(peaks),
        {name: statistics.median(t) for name, t in times.items()},
        {name: k for name, (_, k) in variants.items()},
        statistics.median(bf16_peaks) if bf16_peaks else float("nan"),
    )


#: Hidden width and batch of the (h) fixed-cost copies of an update.
TINY = 8


def overhead_variants(args) -> dict[str, tuple[Callable, Callable, int, float]]:
    """(h): name -> (full-size update, the same at ``TINY`` sizes, agents, 2-thread target)."""
    n, h, k = args.n, args.hidden, args.agents
    out = {}
    for mdtype in product_dtypes(args):
        tag = ", bf16 products" if mdtype is not None else ""
        out[f"SACNLoss({n}), single agent{tag}"] = (
            single_step(make_sacn(n, h, 0, matmul_dtype=mdtype)),
            single_step(make_sacn(n, TINY, 0, matmul_dtype=mdtype)),
            1,
            0.65,
        )
        out[f"population K={k}{tag}"] = (
            make_population(k, n, h, mdtype),
            make_population(k, n, TINY, mdtype),
            k,
            0.80,
        )
    return out


def overhead(args) -> None:
    """(h): the fixed cost of each update and the 2-thread roofline fraction it allows."""
    n, h, b = args.n, args.hidden, args.batch
    variants = overhead_variants(args)
    work = update_flops(n, h, b)

    def batches(size: int, agents: int) -> list[TensorDict]:
        if agents == 1:
            return [batch_on_device(size) for _ in range(4)]
        return [torch.stack([batch_on_device(size) for _ in range(agents)]) for _ in range(4)]

    data = {
        (name, full): batches(b if full else TINY, v[2])
        for name, v in variants.items()
        for full in (True, False)
    }
    threads = (1, 2)
    times = {(name, full, t): [] for name in variants for full in (True, False) for t in threads}
    peaks = {t: [] for t in threads}
    for t in threads:  # warm-up on both thread counts
        torch.set_num_threads(t)
        for name, (fn_full, fn_tiny, _, _) in variants.items():
            for i in range(2):
                fn_full(data[name, True][i])
                fn_tiny(data[name, False][i])
    for r in range(args.rounds):
        for t in threads:
            torch.set_num_threads(t)
            peaks[t].append(bmm_peak(3))
            for name, (fn_full, fn_tiny, _, _) in variants.items():
                for full, fn in ((True, fn_full), (False, fn_tiny)):
                    reps = args.inner if full else 4 * args.inner
                    batch = data[name, full]
                    t0 = time.perf_counter()
                    for i in range(reps):
                        fn(batch[(r + i) % 4])
                    times[name, full, t].append((time.perf_counter() - t0) / reps)
    med = {key: statistics.median(v) for key, v in times.items()}
    peak = {t: statistics.median(v) for t, v in peaks.items()}
    print(
        f"\n(h) fixed cost: each update at full size (T) and with hidden width and batch "
        f"{TINY} (F: the same operators, almost no arithmetic), {args.rounds} rounds, "
        f"medians; fp32 bmm peak {peak[1]:.1f} (1 thread) and {peak[2]:.1f} GFLOP/s (2 threads)"
    )
    print(
        f"  {'update':44s} {'T1 ms':>7s} {'F1 ms':>6s} {'T2 ms':>7s} {'F2 ms':>6s} "
        f"{'rest 1->2':>9s} {'2 threads':>9s} {'bound':>6s} {'target':>6s} {'F2 max':>7s}"
    )
    for name, (_, _, agents, target) in variants.items():
        t1, f1 = med[name, True, 1], med[name, False, 1]
        t2, f2 = med[name, True, 2], med[name, False, 2]
        flops = agents * work
        bound = f2 + (t1 - f1) / 2  # everything but the fixed cost scaling perfectly
        f2_max = flops / (target * peak[2] * 1e9) - (t1 - f1) / 2
        print(
            f"  {name:44s} {1e3 * t1:7.2f} {1e3 * f1:6.2f} {1e3 * t2:7.2f} {1e3 * f2:6.2f} "
            f"{(t1 - f1) / (t2 - f2):8.2f}x {100 * flops / t2 / (peak[2] * 1e9):8.1f}% "
            f"{100 * flops / bound / (peak[2] * 1e9):5.1f}% {100 * target:5.0f}% "
            f"{1e3 * f2_max:7.2f}"
        )
    print(
        "  rest 1->2: (T1 - F1) / (T2 - F2), how the update's arithmetic scaled; 2 threads: "
        "the measured roofline fraction; bound: with F2 + (T1 - F1) / 2; F2 max: the largest "
        "fixed cost that the target allows under that perfect scaling (ms)"
    )


def breakdown(args, threads: int) -> None:
    """(e) Where one ``K``-agent population update spends its time (torch profiler).

    Prints the update's time, the share and achieved GFLOP/s of the hidden-layer
    products (``[K N, B, H] x [K N, H, H]``, the bulk of the counted work) and the
    largest other operators: what bounds the roofline fraction on this machine.
    """
    torch.set_num_threads(threads)
    for mdtype in product_dtypes(args):
        _breakdown_one(args, threads, mdtype)


def _breakdown_one(args, threads: int, mdtype) -> None:
    """(e) for one dtype of the critics' hidden products (``None``: float32)."""
    from torch.profiler import ProfilerActivity, profile

    k, n, h, b = args.agents, args.n, args.hidden, args.batch
    pop = make_population(k, n, h, mdtype)
    data = [torch.stack([batch_on_device(b) for _ in range(k)]) for _ in range(2)]
    for i in range(3):
        pop(data[i % 2])
    reps = 3
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(reps):
            pop(data[i % 2])
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / reps / 1e3  # ms per update
    big = [k * n, h, h]
    hidden = [  # both matrix operands [K N, H, H]-shaped (forward, and both backward products)
        e
        for e in events
        if e.key in ("aten::bmm", "aten::baddbmm")
        and sum(1 for s in e.input_shapes if s and list(s) == big) >= 2
    ]
    mm_ms = sum(e.self_cpu_time_total for e in hidden) / reps / 1e3
    mm_calls = sum(e.count for e in hidden) / reps
    flops = mm_calls * 2 * k * n * b * h * h
    print(
        f"\n[{threads} thread(s)] (e) one population update, K={k}"
        f"{', bf16 products' if mdtype is not None else ''} (torch profiler, {reps} "
        f"updates): {total:.1f} ms; hidden-layer products {mm_calls:.0f} per update, "
        f"{mm_ms:.1f} ms ({100 * mm_ms / total:.0f}%) at {flops / mm_ms / 1e6:.1f} GFLOP/s"
    )
    others = sorted(
        (e for e in events if e not in hidden), key=lambda e: e.self_cpu_time_total, reverse=True
    )[:8]
    for e in others:
        ms = e.self_cpu_time_total / reps / 1e3
        shapes = ", ".join(str(list(s)) for s in e.input_shapes if s)[:60]
        print(f"    {e.key:28s} {ms:6.1f} ms ({100 * ms / total:4.1f}%)  {shapes}")


def _worker(args, agents: int, threads: int, mdtype, barrier, stop, results) -> None:
    """One process: a single-agent update (``agents == 1``) or a population, run on demand.

    ``mdtype``: the critics' hidden products' dtype (``None``: float32). With
    ``--retain-freed-memory`` the process keeps freed memory, as the scripts do
    by default (a spawned process starts with glibc's defaults).
    """
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    if args.retain_freed_memory:
        retain_freed_memory()
    seed = os.getpid() % 1000
    if agents == 1:
        step = single_step(make_sacn(args.n, args.hidden, seed, matmul_dtype=mdtype))
        batches = [make_batch(args.batch) for _ in range(4)]
    else:
        step = make_population(agents, args.n, args.hidden, mdtype, seed=seed)
        batches = [torch.stack([make_batch(args.batch) for _ in range(agents)]) for _ in range(4)]
    for i in range(2):
        step(batches[i])
    while True:
        barrier.wait()  # the processes of one configuration start together
        if stop.value:
            return
        t0 = time.perf_counter()
        for i in range(args.updates):
            step(batches[i % 4])
        results.put(time.perf_counter() - t0)


def aggregate(args, cores: int) -> dict[str, float]:
    """Median aggregate agent-updates/s of each way to run K agents on ``cores`` cores.

    Configurations (processes x agents each x threads each): the population in
    one process on all cores; the population split into one process per core
    (``K / cores`` agents each, 1 thread); ``K`` single-agent processes with 1
    thread each. All processes are started first and stay alive; in each round
    the configurations run one after another, each alone on the machine.
    """
    k = args.agents
    configs = {}
    for mdtype in product_dtypes(args):
        tag = ", bf16" if mdtype is not None else ""
        configs[f"population, 1 process x {k} agents x {cores} threads{tag}"] = (
            [(k, cores)],
            mdtype,
        )
        if k % cores == 0:
            configs[f"population, {cores} processes x {k // cores} agents x 1 thread{tag}"] = (
                [(k // cores, 1)] * cores,
                mdtype,
            )
        configs[f"{k} single-agent processes x 1 thread{tag}"] = ([(1, 1)] * k, mdtype)
    ctx = mp.get_context("spawn")
    stop = ctx.Value("i", 0)
    groups = {}
    for name, (specs, mdtype) in configs.items():
        barrier, results = ctx.Barrier(len(specs) + 1), ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(args, a, t, mdtype, barrier, stop, results))
            for a, t in specs
        ]
        for p in procs:
            p.start()
        groups[name] = (specs, barrier, results, procs)
    rates = {name: [] for name in configs}
    try:
        for _ in range(args.rounds):
            for name, (specs, barrier, results, _) in groups.items():
                barrier.wait()
                elapsed = [results.get() for _ in specs]
                rates[name].append(sum(a for a, _ in specs) * args.updates / max(elapsed))
        stop.value = 1
        for _, barrier, _, _ in groups.values():
            barrier.wait()
    finally:
        for _, _, _, procs in groups.values():
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.terminate()
    return {name: statistics.median(r) for name, r in rates.items()}


def _malloc_worker(args, retain: bool, threads: int, barrier, stop, results) -> None:
    """(g) One process, glibc's malloc keeping freed memory or not; times its variants on demand."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    if retain and not retain_freed_memory():
        raise RuntimeError("retain_freed_memory() did not apply (not glibc?)")
    n, h, k = args.n, args.hidden, args.agents
    variants = {
        f"SACNLoss({n}), single agent": (single_step(make_sacn(n, h, 0)), 1),
        f"population K={k} SACNLoss({n})": (make_population(k, n, h), k),
    }
    if args.bf16:
        variants.update(bf16_variants(args))
    data = {
        name: [
            make_batch(args.batch)
            if not is_population(fn)
            else torch.stack([make_batch(args.batch) for _ in range(kk)])
            for _ in range(4)
        ]
        for name, (fn, kk) in variants.items()
    }
    for name, (fn, _) in variants.items():
        for i in range(2):
            fn(data[name][i])
    while True:
        barrier.wait()
        if stop.value:
            return
        out = {}
        for name, (fn, _) in variants.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for i in range(args.inner):
                fn(data[name][i % 4])
            elapsed = (time.perf_counter() - t0) / args.inner
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.inner
            out[name] = (elapsed, faults)
        results.put(out)


def malloc_comparison(args, threads: int) -> dict[bool, dict[str, tuple[float, float]]]:
    """(g) Median seconds and minor page faults per update, glibc's defaults (False) and
    freed memory kept (True)."""
    ctx = mp.get_context("spawn")
    stop = ctx.Value("i", 0)
    groups = {}
    for retain in (False, True):
        barrier, results = ctx.Barrier(2), ctx.Queue()
        proc = ctx.Process(
            target=_malloc_worker, args=(args, retain, threads, barrier, stop, results)
        )
        proc.start()
        groups[retain] = (barrier, results, proc)
    times: dict[bool, dict[str, list[tuple[float, float]]]] = {False: {}, True: {}}
    try:
        for _ in range(args.rounds):
            for retain, (barrier, results, _) in groups.items():
                barrier.wait()
                for name, t in results.get().items():
                    times[retain].setdefault(name, []).append(t)
        stop.value = 1
        for barrier, _, _ in groups.values():
            barrier.wait()
    finally:
        for _, _, proc in groups.values():
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
    return {
        r: {
            name: (statistics.median(x[0] for x in t), statistics.median(x[1] for x in t))
            for name, t in d.items()
        }
        for r, d in times.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--agents", type=int, default=6, help="K (default 6)")
    p.add_argument("--n", type=int, default=10, help="ensemble size N (default 10)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--inner", type=int, default=2, help="updates per variant and round")
    p.add_argument(
        "--updates", type=int, default=6, help="updates per round in the aggregate comparison"
    )
    p.add_argument("--spqr", action="store_true", help="also a population with SPQR (beta 0/1)")
    p.add_argument("--skip-aggregate", action="store_true", help="only (a)-(c)")
    p.add_argument(
        "--breakdown", action="store_true", help="(e): where a population update's time goes"
    )
    p.add_argument("--only-aggregate", action="store_true", help="only (d)")
    p.add_argument(
        "--overhead",
        action="store_true",
        help="only (h): fixed cost and the 2-thread bound (CPU, always 1 and 2 threads)",
    )
    p.add_argument("--bf16", action="store_true", help="(f): bfloat16 hidden products too")
    p.add_argument("--only-malloc", action="store_true", help="only (g) (implies --malloc)")
    p.add_argument(
        "--malloc", action="store_true", help="(g): glibc malloc keeping freed memory or not"
    )
    p.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="keep freed memory (glibc) in this process: (a)-(c) with the setting",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: (a)-(c) on it")
    p.add_argument("--compile", action="store_true", help="torch.compile the population updates")
    p.add_argument(
        "--cudagraphs", action="store_true", help="capture the population updates (CUDA only)"
    )
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.retain_freed_memory and not retain_freed_memory():
        p.error("--retain-freed-memory: this malloc is not glibc's")
    global DEVICE
    DEVICE = torch.device(args.device)
    cores = len(os.sched_getaffinity(0))
    work = update_flops(args.n, args.hidden, args.batch)
    print(
        f"torch {torch.__version__}, {cores} cores, Hopper sizes (obs {OBS}, act {ACT}), "
        f"N={args.n}, {args.hidden}x{args.hidden}, batch {args.batch}, K={args.agents}; "
        f"{args.rounds} rounds x {args.inner} updates, interleaved; glibc malloc "
        + ("keeping freed memory" if args.retain_freed_memory else "defaults")
    )
    print(
        f"(b) work of one SAC update = B * (6 N critic + 3 actor) = {work / 1e9:.3f} GFLOP "
        f"(critic {mlp_flops([OBS + ACT, args.hidden, args.hidden, 1])} FLOP/sample, "
        f"actor {mlp_flops([OBS, args.hidden, args.hidden, 2 * ACT])} FLOP/sample)"
    )
    args.malloc = args.malloc or args.only_malloc
    if args.overhead:
        if DEVICE.type != "cpu":
            p.error("--overhead is a CPU measurement (1 and 2 threads); use --device cpu")
        overhead(args)
        return
    for threads in [] if args.only_aggregate or args.only_malloc else args.threads:
        peak, meds, agents, bf16_peak = roofline(args, threads)
        print(f"\n[{threads} thread(s)] (a) fp32 bmm peak: {peak:.1f} GFLOP/s")
        if args.bf16:
            print(f"  bf16 bmm peak (reference for (f)): {bf16_peak:.1f} GFLOP/s")
        print(f"  {'update':42s} {'ms/update':>10s} {'agent-upd/s':>12s} {'(c) roofline':>13s}")
        for name, t in meds.items():
            k = agents[name]
            frac = k * work / t / (peak * 1e9)
            print(f"  {name:42s} {1e3 * t:10.1f} {k / t:12.2f} {100 * frac:12.1f}%")
    if args.bf16 and not (args.only_aggregate or args.only_malloc):
        print("  (f) bf16 rows: the fp32-equivalent work against the fp32 peak (a speed ratio)")
    if args.malloc and DEVICE.type == "cpu":
        for threads in args.threads:
            res = malloc_comparison(args, threads)
            print(
                f"\n(g) [{threads} thread(s)] glibc malloc defaults vs keeping freed memory, two "
                f"processes alternating, {args.rounds} rounds x {args.inner} updates; per update: "
                "ms and minor page faults"
            )
            print(f"  {'update':42s} {'defaults':>17s} {'kept':>17s}")
            for name, (t, f) in res[False].items():
                kept, kept_f = res[True][name]
                print(
                    f"  {name:42s} {1e3 * t:7.1f} ms {f:7.0f} {1e3 * kept:7.1f} ms {kept_f:7.0f}"
                    f"   speed-up {t / kept:.2f}x"
                )
    if args.only_malloc:
        return
    if args.breakdown and DEVICE.type == "cpu":
        for threads in args.threads:
            breakdown(args, threads)
    if DEVICE.type != "cpu" and not args.skip_aggregate:
        print("\n(d) skipped: the process comparison is a CPU measurement (use --device cpu)")
    elif not args.skip_aggregate:
        rates = aggregate(args, cores)
        print(
            f"\n(d) aggregate agent-updates/s, K={args.agents} agents on {cores} cores, "
            f"{args.rounds} rounds x {args.updates} updates (time until the last process ends):"
        )
        for name, rate in rates.items():
            print(f"  {name:58s} {rate:8.2f}")
        for name, rate in rates.items():
            if name.startswith("population"):  # against the single processes of its dtype
                tag = ", bf16" if name.endswith(", bf16") else ""
                base = rates[f"{args.agents} single-agent processes x 1 thread{tag}"]
                print(
                    f"  {name.split(',', 1)[1].strip():46s} / single processes: {rate / base:.2f}x"
                )


if __name__ == "__main__":
    main()
