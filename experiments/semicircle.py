"""Experiment 1: how close is the spectrum SPQR compares with the semicircle, at the d in use?

For d = 2 .. 50 it samples symmetric d x d matrices three ways and compares their
eigenvalues with Wigner's semicircle on [-2, 2]:

- ``goe_classic``: GOE ``X = (G + G^T) / sqrt(2)`` scaled by ``1 / sqrt(d)`` (the
  textbook reference, no data-dependent normalisation);
- ``goe``: the same GOE matrices through the package's normalisation
  (:func:`torchrl_spqr.functional.normalize_matrices`: centre, divide by the sample
  std of all d*d entries, scale by ``1/sqrt(d)``);
- ``iid``: ``T = d (d + 1) / 2`` i.i.d. Gaussian "member values" through the
  package's whole path (:func:`~torchrl_spqr.functional.spqr_eigenvalues`: ordered
  filling, mirroring, normalisation), i.e. what SPQR sees for independent critics.

Measured per (case, d, seed): the Kolmogorov distance of the pooled eigenvalues
(the mean ESD) to the semicircle CDF, a binned KL(semicircle || pooled ESD), the
mean Kolmogorov distance of a single matrix's d-point ESD (what SPQR scores, one
matrix per state-action pair), the fraction of eigenvalues at |x| >= 2, and the
package's SPQR KL (paper and corrected density). Two more outputs: pooled
histograms at d = 2 .. 6 (N = 3, 6, 10, 15, 21), and the KL under a planted
outlier member / rank-one spike for N = 10, 15, 21 with the paper and the corrected
density (what the paper density does at |x| >= 2).

    python experiments/semicircle.py --seeds 0 1 2          # ~1 min
    python experiments/semicircle.py --tiny --out /tmp/sc    # seconds

Writes ``semicircle_convergence.csv``, ``semicircle_finite_d.csv``,
``semicircle_outlier.csv`` and ``semicircle_convergence.png``,
``semicircle_finite_d.png``, ``semicircle_density.png``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exp_common import base_parser, group_mean_std, init_worker, pyplot, read_csv, write_csv  # noqa: E402

from torchrl_spqr.diagnostics import acceptance_rate, spectral_spike  # noqa: E402
from torchrl_spqr.functional import (  # noqa: E402
    normalize_matrices,
    soft_semicircle_density,
    spectral_kl,
    spqr_eigenvalues,
)

CASES = ("goe_classic", "goe", "iid")
USED_D = (2, 3, 4, 5, 6)  # N = 3, 6, 10, 15, 21
NUM_BINS = 40


def semicircle_cdf(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(-2, 2)
    return (
        0.5 + x * (4 - x.pow(2)).clamp_min(0).sqrt() / (4 * math.pi) + torch.asin(x / 2) / math.pi
    )


def sample_eigenvalues(case: str, d: int, num: int, gen: torch.Generator) -> torch.Tensor:
    """``[num, d]`` eigenvalues (ascending, float64)."""
    if case == "iid":
        t = d * (d + 1) // 2
        members = torch.randn(t, num, generator=gen, dtype=torch.float64)
        return spqr_eigenvalues(members)
    g = torch.randn(num, d, d, generator=gen, dtype=torch.float64)
    x = (g + g.transpose(-1, -2)) / math.sqrt(2)
    if case == "goe_classic":
        return torch.linalg.eigvalsh(x / math.sqrt(d))
    if case == "goe":
        return torch.linalg.eigvalsh(normalize_matrices(x))
    raise ValueError(case)


def ks_pooled(eig: torch.Tensor) -> float:
    x = eig.flatten().sort().values
    n = x.numel()
    f = semicircle_cdf(x)
    i = torch.arange(1, n + 1, dtype=x.dtype)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


def ks_per_matrix(eig: torch.Tensor) -> float:
    d = eig.shape[-1]
    f = semicircle_cdf(eig)
    i = torch.arange(1, d + 1, dtype=eig.dtype)
    return float(torch.maximum(i / d - f, f - (i - 1) / d).amax(-1).mean())


def kl_binned(eig: torch.Tensor, bins: int = NUM_BINS) -> float:
    """KL(semicircle || pooled ESD) over ``bins`` equal cells of [-2, 2] plus one cell for |x| >= 2.

    The ESD's cell masses get Jeffreys smoothing (+0.5 count); the semicircle puts no
    mass outside, so ESD mass there raises the KL only through the inside cells.
    """
    x = eig.flatten()
    n = x.numel()
    edges = torch.linspace(-2, 2, bins + 1, dtype=torch.float64)
    inside = x.abs() < 2
    counts = torch.histc(x[inside], bins=bins, min=-2, max=2).double()
    out = (~inside).sum().double()
    q = (torch.cat([counts, out.view(1)]) + 0.5) / (n + 0.5 * (bins + 1))
    s = semicircle_cdf(edges[1:]) - semicircle_cdf(edges[:-1])
    return float((s * (s / q[:-1]).log()).sum())


def semicircle_cross_entropy(density: str) -> float:
    """``-int s(x) log p(x) dx``: the large-d limit of ``spqr_kl + log d``."""
    x = torch.linspace(-2, 2, 400_001, dtype=torch.float64)[1:-1]
    s = (4 - x.pow(2)).sqrt() / (2 * math.pi)
    p = soft_semicircle_density(x, density=density)
    dx = float(x[1] - x[0])
    return float(-(s * p.log()).sum() * dx)


def convergence_rows(ds, seeds, num_eigs: int) -> list[dict]:
    rows = []
    for seed in seeds:
        for case in CASES:
            for d in ds:
                gen = torch.Generator().manual_seed(1000 * seed + d + 100_000 * CASES.index(case))
                num = max(math.ceil(num_eigs / d), 8)
                eig = sample_eigenvalues(case, d, num, gen)
                t = d * (d + 1) // 2
                rows.append(
                    {
                        "case": case,
                        "d": d,
                        "N": t,
                        "seed": seed,
                        "num_matrices": num,
                        "ks_pooled": ks_pooled(eig),
                        "kl_binned": kl_binned(eig),
                        "ks_per_matrix": ks_per_matrix(eig),
                        "frac_outside": float((eig.abs() >= 2).double().mean()),
                        "max_abs_eig": float(eig.abs().max()),
                        "second_moment": float(eig.pow(2).mean()),
                        "spqr_kl_paper": float(spectral_kl(eig, density="paper").mean()),
                        "spqr_kl_corrected": float(spectral_kl(eig, density="corrected").mean()),
                    }
                )
    return rows


def finite_d_rows(seeds, num_eigs: int, bins: int = 60, lim: float = 3.0) -> list[dict]:
    rows = []
    edges = torch.linspace(-lim, lim, bins + 1, dtype=torch.float64)
    width = float(edges[1] - edges[0])
    sc = (semicircle_cdf(edges[1:]) - semicircle_cdf(edges[:-1])) / width
    for case in ("goe", "iid"):
        for d in USED_D:
            eigs = []
            for seed in seeds:
                gen = torch.Generator().manual_seed(7 + 1000 * seed + d + 100 * len(case))
                eigs.append(sample_eigenvalues(case, d, max(math.ceil(num_eigs / d), 8), gen))
            x = torch.cat(eigs).flatten()
            hist = torch.histc(x, bins=bins, min=-lim, max=lim).double() / (x.numel() * width)
            for b in range(bins):
                rows.append(
                    {
                        "case": case,
                        "d": d,
                        "N": d * (d + 1) // 2,
                        "bin_left": float(edges[b]),
                        "bin_right": float(edges[b + 1]),
                        "density": float(hist[b]),
                        "semicircle": float(sc[b]),
                    }
                )
    return rows


def outlier_rows(seeds, num: int, thetas) -> list[dict]:
    """KL, spike and acceptance when one member is an outlier / a rank-one spike is planted."""
    rows = []
    for seed in seeds:
        for d in (4, 5, 6):
            t = d * (d + 1) // 2
            for kind in ("outlier_diag", "outlier_offdiag", "rank_one"):
                gen = torch.Generator().manual_seed(500 + 10 * seed + d)
                base = torch.randn(t, num, generator=gen, dtype=torch.float64)
                v = torch.randn(num, d, generator=gen, dtype=torch.float64)
                v = v / v.norm(dim=-1, keepdim=True)
                rows_idx, cols_idx = torch.triu_indices(d, d)
                for theta in thetas:
                    if kind.startswith("outlier"):
                        # one member sits theta member-stds above the others: member T-1 is
                        # the last diagonal entry, member 1 the (0, 1) off-diagonal pair
                        q = base.clone()
                        q[-1 if kind == "outlier_diag" else 1] += theta
                    else:
                        # Wigner matrix (symmetric, upper triangle = members) + theta sqrt(d) v v^T
                        spike = theta * math.sqrt(d) * v[:, rows_idx] * v[:, cols_idx]  # [num, T]
                        q = base + spike.T
                    eig = spqr_eigenvalues(q)
                    for density in ("paper", "corrected"):
                        rows.append(
                            {
                                "kind": kind,
                                "N": t,
                                "d": d,
                                "theta": theta,
                                "density": density,
                                "seed": seed,
                                "spqr_kl": float(spectral_kl(eig, density=density).mean()),
                                "spike": float(spectral_spike(q).mean()),
                                "frac_outside": float((eig.abs() >= 2).double().mean()),
                                "accept": float(acceptance_rate(q.float())),
                            }
                        )
    return rows


METRICS = (
    "ks_pooled",
    "kl_binned",
    "ks_per_matrix",
    "frac_outside",
    "max_abs_eig",
    "second_moment",
    "spqr_kl_paper",
    "spqr_kl_corrected",
)
LABELS = {
    "goe_classic": "GOE, X/sqrt(d) (textbook)",
    "goe": "GOE, package normalisation",
    "iid": "i.i.d. members, package path",
}


def _d_axis(ax) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ticks = [2, 3, 4, 5, 6, 10, 20, 50]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])


def plot_convergence(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    agg = group_mean_std(rows, ["case", "d"], list(METRICS))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2))
    panels = [
        ("ks_pooled", "Kolmogorov distance, pooled eigenvalues", "log"),
        ("kl_binned", "binned KL(semicircle || pooled ESD)", "log"),
        ("ks_per_matrix", "Kolmogorov distance of one matrix's ESD (mean)", "log"),
    ]
    for ax, (m, title, yscale) in zip(axes.flat, panels):
        for case in CASES:
            rs = sorted((r for r in agg if r["case"] == case), key=lambda r: r["d"])
            ax.errorbar(
                [r["d"] for r in rs],
                [r[m] for r in rs],
                yerr=[r[m + "_std"] for r in rs],
                marker="o",
                ms=2.5,
                capsize=1.5,
                label=LABELS[case],
            )
        ds = sorted({r["d"] for r in agg})
        if m == "ks_per_matrix":
            ax.plot(ds, [1 / (2 * d) for d in ds], "k--", lw=0.8, label="lower bound 1/(2d)")
        for d in USED_D:
            ax.axvline(d, color="0.85", lw=0.6, zorder=0)
        _d_axis(ax)
        ax.set_yscale(yscale)
        ax.set_xlabel("matrix side d (N = d(d+1)/2 members)")
        ax.set_ylabel(m)
        ax.set_title(title)
        ax.legend(loc="best")
    ax = axes[1, 1]
    for density, ls in (("paper", "-"), ("corrected", "--")):
        ce = semicircle_cross_entropy(density)
        for case in ("goe", "iid"):
            rs = sorted((r for r in agg if r["case"] == case), key=lambda r: r["d"])
            ax.plot(
                [r["d"] for r in rs],
                [r[f"spqr_kl_{density}"] + math.log(r["d"]) for r in rs],
                ls,
                color=f"C{CASES.index(case)}",
                marker="o",
                ms=2.5,
                label=f"{LABELS[case].split(',')[0]}, {density} density",
            )
        ax.axhline(ce, color="k", ls=ls, lw=0.8, label=f"large-d limit, {density}: {ce:.3f}")
    _d_axis(ax)
    ax.set_xlabel("matrix side d")
    ax.set_ylabel("mean SPQR KL + log d")
    ax.set_title("SPQR KL (plug-in) + log d vs its large-d limit")
    ax.legend(loc="best", fontsize=7)
    seeds = len({r["seed"] for r in rows})
    fig.suptitle(
        f"Experiment 1: convergence to the semicircle (mean +- std over {seeds} seeds; grey: d in use)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_finite_d(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    ds = sorted({r["d"] for r in rows})
    fig, axes = plt.subplots(1, len(ds), figsize=(2.9 * len(ds), 3.3), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], ds):
        for case, style in (("iid", "C2"), ("goe", "C1")):
            rs = [r for r in rows if r["d"] == d and r["case"] == case]
            ax.stairs(
                [r["density"] for r in rs],
                [rs[0]["bin_left"]] + [r["bin_right"] for r in rs],
                color=style,
                label=LABELS[case].split(",")[0],
            )
        rs = [r for r in rows if r["d"] == d and r["case"] == "iid"]
        ax.plot(
            [(r["bin_left"] + r["bin_right"]) / 2 for r in rs],
            [r["semicircle"] for r in rs],
            "k--",
            lw=1,
            label="semicircle",
        )
        bound = math.sqrt((d * d - 1) / d)
        ax.axvspan(bound, 3, color="0.9", zorder=0)
        ax.axvspan(-3, -bound, color="0.9", zorder=0, label="|x| > sqrt((d^2-1)/d): unreachable")
        ax.set_title(f"d = {d} (N = {d * (d + 1) // 2})")
        ax.set_xlabel("eigenvalue")
        ax.set_xlim(-3, 3)
    axes[0, 0].set_ylabel("density (pooled)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(
        "Pooled eigenvalue density after the package's normalisation, at the d in use", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


TITLES = {
    "outlier_diag": "one outlier member on the diagonal",
    "outlier_offdiag": "one outlier member off the diagonal",
    "rank_one": "planted rank-one spike",
}


def plot_density(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    x = torch.linspace(-3, 3, 1201, dtype=torch.float64)
    ax = axes[0]
    s = torch.where(
        x.abs() < 2, (4 - x.pow(2)).clamp_min(0).sqrt() / (2 * math.pi), torch.zeros_like(x)
    )
    ax.plot(x, s, "k:", label="semicircle s(x)")
    ax.plot(x, soft_semicircle_density(x, density="paper"), label="paper p(x)")
    ax.plot(x, soft_semicircle_density(x, density="corrected"), "--", label="corrected p(x)")
    ax.set_xlabel("eigenvalue x")
    ax.set_ylabel("target density")
    ax.set_title("target densities (rho = 0.5, eps = 0.01)")
    ax.legend(loc="upper left")
    agg = group_mean_std(rows, ["kind", "N", "d", "theta", "density"], ["spqr_kl", "accept"])
    for ax, kind, xlabel in (
        (axes[1], "outlier_diag", "shift theta of one diagonal member (member stds)"),
        (axes[2], "outlier_offdiag", "shift theta of one off-diagonal member (member stds)"),
        (axes[3], "rank_one", "rank-one spike theta (theta sqrt(d) v v^T)"),
    ):
        for i, n in enumerate(sorted({r["N"] for r in agg})):
            for density, ls in (("paper", "-"), ("corrected", "--")):
                rs = sorted(
                    (
                        r
                        for r in agg
                        if r["kind"] == kind and r["N"] == n and r["density"] == density
                    ),
                    key=lambda r: r["theta"],
                )
                base = rs[0]["spqr_kl"]
                ax.plot(
                    [r["theta"] for r in rs],
                    [r["spqr_kl"] - base for r in rs],
                    ls,
                    color=f"C{i}",
                    marker="o",
                    ms=2.5,
                    label=f"N = {n}, {density}",
                )
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean SPQR KL minus its value at theta = 0")
        ax.set_title(TITLES[kind])
        ax.legend(loc="best", fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> Path:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--max-d", type=int, default=50)
    p.add_argument("--num-eigs", type=int, default=100_000, help="eigenvalues per (case, d, seed)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNGs from the CSVs")
    args = p.parse_args(argv)
    init_worker()
    out = args.out
    paths = {k: out / f"semicircle_{k}.csv" for k in ("convergence", "finite_d", "outlier")}
    if args.plot_only:
        conv, fin, outl = (read_csv(paths[k]) for k in ("convergence", "finite_d", "outlier"))
    else:
        if args.tiny:
            ds, num, thetas, n_out = [2, 3, 4, 6, 10, 20], 3000, [0.0, 4.0, 10.0], 512
        else:
            ds, num, thetas, n_out = (
                list(range(2, args.max_d + 1)),
                args.num_eigs,
                [float(t) for t in range(0, 11)],
                8192,
            )
        conv = convergence_rows(ds, args.seeds, num)
        fin = finite_d_rows(args.seeds, num)
        outl = outlier_rows(args.seeds, n_out, thetas)
        write_csv(conv, paths["convergence"])
        write_csv(fin, paths["finite_d"])
        write_csv(outl, paths["outlier"])
    plot_convergence(conv, out / "semicircle_convergence.png")
    plot_finite_d(fin, out / "semicircle_finite_d.png")
    plot_density(outl, out / "semicircle_density.png")
    print(f"wrote {paths['convergence']}")
    return paths["convergence"]


if __name__ == "__main__":
    main()
