"""Experiment 4: does the spectral measure track the members' independence?

Two parts.

A. Controlled dependence. ``N`` member values ``Q_k(b) = Q*(b) + e_k(b)`` on ``B``
   pairs, with errors of unit variance and one kind of dependence at strength ``c``:

   - ``common``: ``e_k = sqrt(c) u + sqrt(1-c) eps_k``, one error shared by all
     members (what regressing on the same targets produces); pairwise error
     correlation ``c``;
   - ``clusters``: two halves of the ensemble, each with its own shared error
     (within-half correlation ``c``, none across);
   - ``pair``: member 1 copies member 0 (``e_1 = sqrt(c) e_0 + sqrt(1-c) eps_1``);
   - ``outlier``: member 0's error has std ``1 + 4c`` (not i.i.d., no correlation).

   For each, the direct measures (error correlation against the truth, the
   package's residual correlation and its Marchenko-Pastur ratio) and the spectral
   ones (SPQR KL, spike, acceptance rate).

B. Across the trained ensembles of experiments 2 and 3 (bandit, chain, Hopper):
   Spearman rank correlations, within each N, between the spectral statistics and
   the direct measures. Reads the committed CSVs; run the other experiments first.

    python experiments/spectral_vs_direct.py --seeds 0 1 2      # ~1 min
    python experiments/spectral_vs_direct.py --tiny --out /tmp/sv

Writes ``spectral_vs_direct_synthetic.csv``, ``spectral_vs_direct_runs.csv``
(and the PNGs of the same names).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exp_common import (
    RESULTS,
    base_parser,
    group_mean_std,
    init_worker,
    pyplot,
    read_csv,
    write_csv,
)  # noqa: E402
from toy_problems import diagnostic_density, ensemble_metrics  # noqa: E402

KINDS = ("common", "clusters", "pair", "outlier")
STRENGTHS = tuple(round(0.1 * i, 1) for i in range(10))
MEASURES = ("err_corr", "resid_corr", "mp_ratio", "spqr_kl", "spike", "accept")


def synthetic_errors(kind: str, c: float, n: int, b: int, gen: torch.Generator) -> torch.Tensor:
    eps = torch.randn(n, b, generator=gen, dtype=torch.float64)
    if kind == "common":
        u = torch.randn(1, b, generator=gen, dtype=torch.float64)
        return math.sqrt(c) * u + math.sqrt(1 - c) * eps
    if kind == "clusters":
        g = torch.randn(2, b, generator=gen, dtype=torch.float64)
        half = torch.arange(n) >= n // 2
        return math.sqrt(c) * g[half.long()] + math.sqrt(1 - c) * eps
    if kind == "pair":
        e = eps.clone()
        e[1] = math.sqrt(c) * eps[0] + math.sqrt(1 - c) * eps[1]
        return e
    if kind == "outlier":
        e = eps.clone()
        e[0] = (1 + 4 * c) * eps[0]
        return e
    raise ValueError(kind)


def synthetic_rows(seeds, sizes, batch: int, strengths) -> list[dict]:
    rows = []
    for seed in seeds:
        for n in sizes:
            gen = torch.Generator().manual_seed(seed * 100 + n)
            q_true = 3 * torch.randn(batch, generator=gen, dtype=torch.float64)
            for kind in KINDS:
                for c in strengths:
                    e = synthetic_errors(kind, c, n, batch, gen)
                    m = ensemble_metrics(q_true + 0.3 * e, q_true, diagnostic_density(n))
                    rows.append(
                        {
                            "kind": kind,
                            "N": n,
                            "strength": c,
                            "seed": seed,
                            **{k: m[k] for k in MEASURES},
                        }
                    )
    return rows


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def run_points(results: Path) -> list[dict]:
    """One point per trained ensemble and eval set (toys) or per logged update (Hopper)."""
    pts = []
    seen = set()  # the N = 10 runs of beta_sweep.csv reappear in ensemble_size.csv
    for name in ("beta_sweep.csv", "ensemble_size.csv"):
        path = results / name
        if not path.exists():
            continue
        for r in read_csv(path):
            key = (r["problem"], r["N"], r["beta"], r["density"], r["seed"])
            if key in seen:
                continue
            seen.add(key)
            ev = {"bandit": "uniform", "chain": "grid"}[r["problem"]]
            pts.append(
                {
                    "source": r["problem"],
                    "N": r["N"],
                    "beta": r["beta"],
                    "seed": r["seed"],
                    **{m: r[f"{ev}_{m}"] for m in MEASURES},
                }
            )
    path = results / "ensemble_size_hopper_curves.csv"
    if path.exists():
        for r in read_csv(path):
            if r.get("spqr_kl") in ("", None):
                continue
            pts.append(
                {
                    "source": "hopper",
                    "N": r["N"],
                    "beta": r["beta"],
                    "seed": 0,
                    "err_corr": math.nan,  # no true Q on Hopper
                    "resid_corr": r["spqr_mean_pairwise_corr"],
                    "mp_ratio": r["spqr_mp_ratio"],
                    "spqr_kl": r["spqr_kl"],
                    "spike": r["spqr_spike"],
                    "accept": r["spqr_accept_rate"],
                }
            )
    return pts


PAIRS = (
    ("spqr_kl", "err_corr"),
    ("spqr_kl", "resid_corr"),
    ("spqr_kl", "mp_ratio"),
    ("spike", "resid_corr"),
    ("spike", "mp_ratio"),
    ("accept", "mp_ratio"),
)


def correlation_rows(pts: list[dict]) -> list[dict]:
    rows = []
    groups = sorted({(p["source"], p["N"]) for p in pts})
    for source, n in groups:
        ps = [p for p in pts if p["source"] == source and p["N"] == n]
        row = {"source": source, "N": n, "points": len(ps)}
        for a, b in PAIRS:
            xs = [(float(p[a]), float(p[b])) for p in ps if _ok(p[a]) and _ok(p[b])]
            row[f"rho_{a}__{b}"] = (
                spearman([x for x, _ in xs], [y for _, y in xs]) if xs else math.nan
            )
        rows.append(row)
    return rows


def _ok(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


LABELS = {
    "resid_corr_x": "residual corr. minus null -1/(N-1)",
    "spqr_kl_x": "SPQR KL minus i.i.d. null mean",
    "spike_x": "spike minus i.i.d. null mean",
    "err_corr": "error corr. vs truth",
    "resid_corr": "residual corr. (pkg)",
    "mp_ratio": "MP ratio (pkg)",
    "spqr_kl": "SPQR KL",
    "spike": "spike",
    "accept": "acceptance rate",
}


def plot_synthetic(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    n_show = sorted({r["N"] for r in rows})
    agg = group_mean_std(rows, ["kind", "N", "strength"], list(MEASURES))
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(2.7 * len(MEASURES), 2.9))
    shifted = ("spqr_kl", "spike")  # their levels depend on N: show the change from c = 0
    for ax, m in zip(axes, MEASURES):
        for i, kind in enumerate(KINDS):
            for n, ls in zip(n_show, ("-", "--", ":")):
                rs = sorted(
                    (r for r in agg if r["kind"] == kind and r["N"] == n),
                    key=lambda r: r["strength"],
                )
                base = rs[0][m] if m in shifted else 0.0
                ax.plot(
                    [r["strength"] for r in rs],
                    [r[m] - base for r in rs],
                    ls,
                    color=f"C{i}",
                    marker="o",
                    ms=2,
                    label=f"{kind}, N={n}",
                )
        ax.set_xlabel("dependence strength c")
        ax.set_title(LABELS[m] + (" (change from c = 0)" if m in shifted else ""), fontsize=9)
    axes[0].legend(loc="best", fontsize=6)
    fig.suptitle(
        "Experiment 4A: which measure sees which dependence (mean over seeds)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def null_levels(num_members: int) -> dict[str, float]:
    """Mean SPQR KL, spike and residual correlation of i.i.d. Gaussian members (the null)."""
    from torchrl_spqr import spqr_kl
    from torchrl_spqr.diagnostics import spike_null_distribution
    from torchrl_spqr.functional import matrix_side

    g = torch.Generator().manual_seed(0)
    q = torch.randn(num_members, 20_000, generator=g)
    return {
        "spqr_kl": float(spqr_kl(q, density=diagnostic_density(num_members))),
        "spike": float(spike_null_distribution(matrix_side(num_members)).mean()),
        "resid_corr": -1.0 / (num_members - 1),
    }


def plot_runs(pts: list[dict], path: Path) -> None:
    plt = pyplot()
    nulls = {n: null_levels(n) for n in {p["N"] for p in pts}}
    pts = [
        {**p, **{f"{k}_x": float(p[k]) - v for k, v in nulls[p["N"]].items() if _ok(p[k])}}
        for p in pts
    ]
    panels = [
        ("resid_corr_x", "spqr_kl_x"),
        ("mp_ratio", "spqr_kl_x"),
        ("err_corr", "spqr_kl_x"),
        ("mp_ratio", "spike_x"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2))
    markers = {"bandit": "o", "chain": "s", "hopper": "."}
    sizes = sorted({p["N"] for p in pts})
    for ax, (xk, yk) in zip(axes, panels):
        for src, mk in markers.items():
            for i, n in enumerate(sizes):
                ps = [
                    p
                    for p in pts
                    if p["source"] == src and p["N"] == n and _ok(p.get(xk)) and _ok(p.get(yk))
                ]
                if ps:
                    ax.scatter(
                        [float(p[xk]) for p in ps],
                        [float(p[yk]) for p in ps],
                        s=10 if mk != "." else 4,
                        marker=mk,
                        color=f"C{i}",
                        alpha=0.7,
                        label=f"{src} N={n}",
                    )
        ax.set_xlabel(LABELS[xk])
        ax.set_ylabel(LABELS[yk])
    axes[0].legend(loc="best", fontsize=6, ncol=2)
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.6, ls=":")
    fig.suptitle(
        "Experiment 4B: spectral vs direct measures across trained ensembles "
        "(colour: N; o bandit, s chain, . Hopper log rows)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> Path:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 21])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument(
        "--runs-from", type=Path, default=RESULTS, help="folder with the CSVs of 2 and 3"
    )
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    init_worker()
    out = args.out
    syn_path = out / "spectral_vs_direct_synthetic.csv"
    if args.plot_only:
        syn = read_csv(syn_path)
    else:
        strengths = (0.0, 0.5, 0.9) if args.tiny else STRENGTHS
        syn = synthetic_rows(args.seeds, args.sizes, 128 if args.tiny else args.batch, strengths)
        write_csv(syn, syn_path)
    plot_synthetic(syn, out / "spectral_vs_direct_synthetic.png")
    pts = run_points(args.runs_from)
    if pts:
        corr = correlation_rows(pts)
        write_csv(corr, out / "spectral_vs_direct_runs.csv")
        plot_runs(pts, out / "spectral_vs_direct_runs.png")
    print(f"wrote {syn_path}")
    return syn_path


if __name__ == "__main__":
    main()
