"""Figures from run folders and checkpoints: learning curves, SPQR diagnostics, effects, spectra.

Every figure is written as ``<out>.<fmt>`` for each requested format (png, svg, pdf)
with matplotlib's Agg backend:

- :func:`plot_run`: ``learning_curve.<fmt>`` of one run (returns and diagnostics), and
  :func:`learning_curves_at_exit`, which draws it when a script's loop exits, however it exits;
- :func:`plot_learning_curves` / :func:`plot_diagnostics`: per group (arm), the mean over
  seeds and a confidence band of that mean (:mod:`torchrl_spqr.analysis.stats`);
- :func:`plot_effects`: forest plot of SPQR's paired effect
  (:func:`torchrl_spqr.analysis.report.paired_effects`);
- :func:`plot_spectrum` / :func:`plot_member_correlation`: the normalised SPQR eigenvalues
  of a saved ensemble against the semicircle, and its members' correlations
  (:func:`torchrl_spqr.analysis.critics.checkpoint_q_values`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchrl_spqr import diagnostics as D
from torchrl_spqr import functional as F
from torchrl_spqr.analysis.critics import EnsembleBatch
from torchrl_spqr.analysis.runs import group_runs, read_metrics, series, step_key
from torchrl_spqr.analysis.stats import ci_text, group_curve

__all__ = [
    "DIAGNOSTICS",
    "learning_curves_at_exit",
    "plot_diagnostics",
    "plot_effects",
    "plot_groups",
    "plot_learning_curves",
    "plot_member_correlation",
    "plot_run",
    "plot_spectrum",
]

_DIAG = [
    ("spqr_kl", "SPQR KL"),
    ("spqr_spike", "spike (max |eigenvalue|)"),
    ("spqr_accept_rate", "acceptance rate (level 0.05)"),
    ("spqr_mp_ratio", "residual top eigenvalue / MP edge"),
    ("spqr_ensemble_std", "ensemble std of Q"),
]

#: Panels of ``diagnostics.<fmt>``: metric, axis label, reference line (value, label) or None.
DIAGNOSTICS = [
    ("spqr_kl", "SPQR KL (mean over batch)", None),
    ("spqr_spike", "spike: max |eigenvalue|", None),
    (
        "spqr_accept_rate",
        "acceptance rate of the\nindependence test (level 0.05)",
        (0.95, "dashed: 0.95, the rate of independent members"),
    ),
    (
        "spqr_mp_ratio",
        "residual top eigenvalue\n/ Marchenko-Pastur edge",
        (1.0, "dashed: 1, the edge for independent members"),
    ),
    ("spqr_mean_pairwise_corr", "mean pairwise residual\ncorrelation", None),
    ("spqr_ensemble_std", "ensemble std of Q", None),
]

_LABELS = {
    "eval_return": "evaluation return",
    "train_return": "training episode return",
    "normalized_score": "normalised score",
}


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, formats) -> list[Path]:
    """Write ``fig`` as ``out.<fmt>`` for each format and close it; ``[]`` when ``fig`` is None."""
    if fig is None:
        return []
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out.with_name(out.name + "." + fmt)
        fig.savefig(p, dpi=110)
        paths.append(p)
    _mpl().close(fig)
    return paths


def plot_run(
    run_dir: str | Path, formats: tuple[str, ...] = ("png",), *, missing_ok: bool = False
) -> list[Path]:
    """Write ``learning_curve.<fmt>`` (evaluation and training return, diagnostics) in ``run_dir``.

    ``missing_ok=True`` (for training scripts, whose result is ``metrics.csv``): without
    matplotlib no figure is drawn and ``[]`` is returned instead of raising ImportError.
    """
    try:
        plt = _mpl()
    except ImportError:
        if missing_ok:
            return []
        raise
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    ax = axes[0, 0]
    x, y = series(rows, "eval_return")
    ax.plot(x, y, "o-", label="evaluation (deterministic, mean over episodes)")
    x, y = series(rows, "train_return")
    ax.plot(x, y, ".", alpha=0.5, label="training episodes")
    xlabel = "environment steps" if step_key(rows) == "frames" else "gradient updates"
    if any("normalized_score" in r for r in rows):
        x, y = series(rows, "normalized_score")
        ax2 = ax.twinx()
        ax2.plot(x, y, "s--", color="tab:green", label="normalised score")
        ax2.set_ylabel("normalised score (100 = reference expert)")
        ax2.legend(fontsize=8, loc="lower right")
    ax.set(xlabel=xlabel, ylabel="return", title=run_dir.name)
    ax.legend(fontsize=8)
    for ax, (key, label) in zip(axes.flat[1:], _DIAG):
        x, y = series(rows, key)
        ax.plot(x, y)
        ax.set(xlabel=xlabel, ylabel=label, title=label)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, run_dir / "learning_curve", formats)


@contextlib.contextmanager
def learning_curves_at_exit(*run_dirs: str | Path) -> Iterator[None]:
    """Draw each run folder's ``learning_curve.png`` when the block exits, however it exits.

    The scripts wrap their loop in it, so a run stopped by Ctrl-C or SIGTERM (or ended by
    an error) still gets the figure of the rows it wrote, as a finished run does. After a
    normal exit a failure to draw raises. After an exception it is reported on stderr as
    one line, and the exception that ended the block propagates unchanged (a stop keeps its
    exit code). The figure is redrawn from ``metrics.csv`` at every exit, so a resumed run
    replaces it.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from torchrl_spqr.analysis import learning_curves_at_exit
        >>> from torchrl_spqr.training.loggers import MetricsCSVLogger
        >>> run_dir = Path(tempfile.mkdtemp())
        >>> try:
        ...     with learning_curves_at_exit(run_dir):
        ...         rows = MetricsCSVLogger(run_dir)
        ...         _ = rows.log_metrics({"frames": 1000, "eval_return": 12.5})
        ...         rows.shutdown()
        ...         raise KeyboardInterrupt  # Ctrl-C
        ... except KeyboardInterrupt:
        ...     pass
        >>> (run_dir / "learning_curve.png").exists()
        True
    """
    try:
        yield
    except BaseException:
        for run_dir in run_dirs:
            try:
                plot_run(run_dir)
            except Exception as err:  # a second Ctrl-C here is not swallowed
                print(
                    f"warning: no learning curve drawn in {run_dir}: {type(err).__name__}: {err}",
                    file=sys.stderr,
                )
        raise
    for run_dir in run_dirs:
        plot_run(run_dir)


def _group_rows(
    groups: dict[str, list[Path]], until: float | None = None
) -> dict[str, list[list[dict[str, float]]]]:
    return {g: [read_metrics(r, until) for r in runs] for g, runs in groups.items()}


def _panels(
    rows_by_group,
    panels: list[tuple[str, str, Any]],
    *,
    title: str,
    level: float,
    method: str,
    smooth: int,
    ncols: int = 3,
):
    """One panel per metric, one line (mean) and band (CI) per group; legend below."""
    plt = _mpl()
    panels = [
        p
        for p in panels
        if any(series(rows, p[0])[0] for runs in rows_by_group.values() for rows in runs)
    ]
    if not panels:
        return None
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    n_groups = len(rows_by_group)
    legend_cols = 1 if n_groups > 4 else min(n_groups, 2)
    legend_rows = math.ceil(n_groups / legend_cols)
    fig_h = 3.4 * nrows + 0.8 + 0.22 * legend_rows
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.2 * ncols, fig_h), squeeze=False, layout="constrained"
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles, interpolated = {}, False
    for ax, (key, label, ref) in zip(axes.flat, panels):
        step_keys = set()
        for i, (gname, runs) in enumerate(rows_by_group.items()):
            c = group_curve(runs, key, level=level, method=method, smooth=smooth)
            if c is None:
                continue
            interpolated |= c.interpolated
            step_keys.add(c.step_key)
            color = colors[i % len(colors)]
            (line,) = ax.plot(c.steps, c.mean, color=color, lw=1.6)
            if c.seeds > 1:
                ax.fill_between(c.steps, c.lo, c.hi, color=color, alpha=0.2, lw=0)
            seeds = f"{c.seeds} seed" + ("s" if c.seeds > 1 else ", no band")
            handles.setdefault(gname, (line, f"{gname} ({seeds})"))
        if ref is not None:
            ax.axhline(ref[0], color="k", ls="--", lw=0.9, alpha=0.7)
            ax.set_title(ref[1], fontsize=8.5)
        names = {"frames": "environment steps", "updates": "gradient updates"}
        ax.set_xlabel(" / ".join(names[k] for k in sorted(step_keys)) or "steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    caption = f"line: mean over seeds; band: {ci_text(method, level)}"
    if smooth > 1:
        caption += f"; each run smoothed by a trailing mean over {smooth} logged points"
    if interpolated:
        caption += "; runs interpolated onto common steps"
    fig.suptitle(f"{title}\n{caption}", fontsize=10)
    hs = [h for h, _ in handles.values()]
    ls = [lab for _, lab in handles.values()]
    fig.legend(hs, ls, loc="outside lower center", ncol=legend_cols, fontsize=9, frameon=False)
    return fig


def plot_learning_curves(
    groups: dict[str, list[Path]],
    out: str | Path,
    *,
    key: str = "eval_return",
    formats=("png",),
    level: float = 0.95,
    method: str = "t",
    smooth: int = 1,
    title: str = "",
    until: float | None = None,
) -> list[Path]:
    """``out.<fmt>``: ``key``, training return (and normalised score) per group over steps.

    ``until``: each run's rows up to that step only (see :func:`read_metrics`).
    """
    rows = _group_rows(groups, until)
    keys = [key, "train_return", "normalized_score", "eval_return"]
    keys = list(dict.fromkeys(keys))[:3]
    panels = [(k, _LABELS.get(k, k), None) for k in keys]
    fig = _panels(
        rows,
        panels,
        title=title or "learning curves",
        level=level,
        method=method,
        smooth=smooth,
    )
    return _save(fig, Path(out), formats)


def plot_diagnostics(
    groups: dict[str, list[Path]],
    out: str | Path,
    *,
    formats=("png",),
    level: float = 0.95,
    method: str = "t",
    smooth: int = 1,
    title: str = "",
    until: float | None = None,
) -> list[Path]:
    """``out.<fmt>``: the SPQR diagnostics of :data:`DIAGNOSTICS` per group over steps.

    ``until``: each run's rows up to that step only (see :func:`read_metrics`).
    """
    fig = _panels(
        _group_rows(groups, until),
        DIAGNOSTICS,
        title=title or "SPQR diagnostics during training",
        level=level,
        method=method,
        smooth=smooth,
    )
    return _save(fig, Path(out), formats)


def plot_groups(
    run_dirs,
    out: str | Path,
    keys: tuple[str, ...] = ("eval_return", "spqr_kl", "spqr_accept_rate"),
    formats: tuple[str, ...] = ("png",),
    *,
    level: float = 0.95,
    method: str = "t",
    until: float | None = None,
) -> list[Path]:
    """One figure ``out.<fmt>``, one panel per metric in ``keys``, runs grouped by arm.

    ``until``: each run's rows up to that step only (see :func:`read_metrics`).
    """
    rows = _group_rows(group_runs(run_dirs), until)
    labels = {k: lab for k, lab, _ in DIAGNOSTICS}
    panels = [(k, _LABELS.get(k, labels.get(k, k)), None) for k in keys]
    fig = _panels(
        rows, panels, title="comparison", level=level, method=method, smooth=1, ncols=len(keys)
    )
    out = Path(out)
    return _save(fig, out.with_suffix("") if out.suffix in (".png", ".svg") else out, formats)


def plot_effects(
    rows: list[dict[str, Any]], out: str | Path, formats=("png",), level: float = 0.95
) -> list[Path]:
    """``out.<fmt>``: forest plot of SPQR's paired effect per comparison (final, best, acceptance)."""
    if not rows:
        return []
    plt = _mpl()
    n = len(rows)
    has_acc = any("accept_base" in r for r in rows)
    ncols = 3 if has_acc else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols + 3, 0.55 * n + 2.2), sharey=True)
    ys = np.arange(n)[::-1]
    labels = [
        f"{r['comparison']} (beta={r['beta']:g}, {len(r['seeds'])} "
        f"seed{'s' if len(r['seeds']) > 1 else ''})"
        for r in rows
    ]
    for ax, name in zip(axes, ("final", "best")):
        for y, r in zip(ys, rows):
            m = r[f"{name}_rel_mean"]
            lo, hi = r[f"{name}_rel_ci"]
            one = len(r["seeds"]) < 2
            ax.errorbar(
                m, y, xerr=[[m - lo], [hi - m]], fmt="s" if one else "o",
                color="tab:gray" if one else "tab:blue", capsize=3,
            )  # fmt: skip
        ax.axvline(0.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel(f"{name} {rows[0]['key']}: SPQR - baseline\n(% of the baseline's mean)")
        ax.grid(alpha=0.3)
    if has_acc:
        ax = axes[2]
        for y, r in zip(ys, rows):
            if "accept_base" in r:
                ax.plot([r["accept_base"], r["accept_spqr"]], [y, y], color="0.7", zorder=1)
                ax.scatter(r["accept_base"], y, marker="o", color="tab:gray", zorder=2)
                ax.scatter(r["accept_spqr"], y, marker="D", color="tab:red", zorder=3)
        ax.axvline(0.95, color="k", lw=0.8, ls="--")
        ax.set_xlabel("acceptance rate of the independence test\n(dashed: 0.95, independent)")
        ax.scatter([], [], marker="o", color="tab:gray", label="baseline")
        ax.scatter([], [], marker="D", color="tab:red", label="SPQR")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(ys, labels, fontsize=8)
    pct = f"{100 * level:g}%"
    fig.suptitle(
        f"SPQR's effect, runs paired by seed: mean difference and {pct} Student-t interval "
        "(grey squares: one seed, no interval)",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, Path(out), formats)


def _pairs_text(pairs: str) -> str:
    return {
        "data": "Q_k(s, a) at stored pairs",
        "next_policy": "Q_k(s', a'~pi(s'))",
        "policy": "Q_k(s, a~pi(s))",
    }[pairs]


def _density_ok(rho: float, eps: float, density: str) -> bool:

    try:
        F.check_density_params(rho, eps, density)
    except (TypeError, ValueError):
        return False
    return True


def plot_spectrum(batch: EnsembleBatch, out: str | Path, formats=("png",)) -> list[Path]:
    """Histogram of the normalised SPQR eigenvalues against the semicircle; spike vs its null.

    Left: the eigenvalues of every normalised ``d x d`` SPQR matrix of the batch
    (the matrices the regulariser uses), the eigenvalue density of i.i.d.
    Gaussian members at the same ``d`` (the finite-``d`` null), Wigner's
    semicircle, and the two target densities of the KL (``"paper"`` and
    ``"corrected"``, with the run's ``rho`` and ``eps``; they are the unnormalised
    functions the KL uses). Right: the spike statistic against its null with the
    5% rejection threshold.
    """

    plt = _mpl()
    q = batch.q.double()
    n = q.shape[0]
    d = F.matrix_side(n)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eig = F.spqr_eigenvalues(q, batch.filling, generator=gen)  # [B, d]
        t = d * (d + 1) // 2
        null_eig = F.spqr_eigenvalues(torch.randn(t, 20_000, generator=gen, dtype=torch.float64))
    # the "corrected" density needs rho < 1 and eps > 0: a run outside that range gets the
    # paper curve only (its own density), not an error
    densities = [dens for dens in ("paper", "corrected") if _density_ok(batch.rho, batch.eps, dens)]
    kls = {
        dens: float(F.spectral_kl(eig, rho=batch.rho, eps=batch.eps, density=dens).mean())
        for dens in densities
    }
    kl_null = float(F.spectral_kl(null_eig, rho=batch.rho, eps=batch.eps, density="paper").mean())
    xmax = max(2.6, float(eig.abs().max()) * 1.08)
    xs = torch.linspace(-xmax, xmax, 801, dtype=torch.float64)

    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(13, 6.2), gridspec_kw={"width_ratios": [1.5, 1]}, layout="constrained"
    )
    bins = np.linspace(-xmax, xmax, 49)
    ax.hist(
        eig.flatten().numpy(),
        bins=bins,
        density=True,
        color="tab:blue",
        alpha=0.55,
        label=f"ensemble eigenvalues ({eig.shape[0]} pairs x d={d})",
    )
    ax.hist(
        null_eig.flatten().numpy(),
        bins=bins,
        density=True,
        histtype="step",
        color="k",
        lw=1.2,
        label=f"i.i.d. Gaussian members, same d={d} (null)",
    )
    ax.plot(xs, F.semicircle_density(xs), color="tab:green", lw=1.8, label="Wigner semicircle")
    for dens, style in (("paper", "--"), ("corrected", ":")):
        if dens not in kls:
            continue
        ax.plot(
            xs,
            F.soft_semicircle_density(xs, rho=batch.rho, eps=batch.eps, density=dens),
            style,
            color="tab:red" if dens == "paper" else "tab:purple",
            lw=1.8,
            label=f"SPQR target p(x), {dens} (KL {kls[dens]:.3f})",
        )
    ax.set_xlabel("eigenvalue of the normalised SPQR matrix")
    ax.set_ylabel("density")
    ax.set_xlim(-xmax, xmax)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    ax.set_title(
        f"spectrum: KL paper {kls['paper']:.3f} (null {kl_null:.3f}); "
        f"used density: {batch.density}",
        fontsize=10,
    )

    spikes = eig.abs().amax(-1)
    null_sp = D.spike_null_distribution(d)
    thr = float(null_sp[int(0.95 * (null_sp.numel() - 1))])
    accept = float((D.spike_pvalue(spikes, d) >= 0.05).double().mean())
    s_lo = min(float(spikes.min()), float(null_sp[int(0.001 * null_sp.numel())])) * 0.98
    sbins = np.linspace(s_lo, max(float(spikes.max()), float(null_sp[-1])) * 1.02, 41)
    ax2.hist(spikes.numpy(), bins=sbins, density=True, alpha=0.55, label="ensemble")
    ax2.hist(
        null_sp.numpy(), bins=sbins, density=True, histtype="step", color="k", lw=1.2, label="null"
    )
    ax2.axvline(thr, color="tab:red", ls="--", lw=1.2, label=f"5% threshold {thr:.2f}")
    ax2.set_xlabel("spike: max |eigenvalue| per pair")
    ax2.set_ylabel("density")
    ax2.set_title(f"independence test: acceptance {accept:.3f} (null 0.95)", fontsize=10)
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    ax2.grid(alpha=0.3)
    meta = batch.meta
    when = f", {meta['frames']} frames" if meta.get("frames") else ""
    fig.suptitle(
        f"{batch.label}: {meta.get('algorithm', '')} on {meta.get('env', '')}{when}, "
        f"N={n} (d={d}, {batch.filling} filling), {_pairs_text(batch.pairs)}\n"
        f"states: {batch.source}",
        fontsize=10,
    )
    return _save(fig, Path(out), formats)


def _corr(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return x @ x.T


def plot_member_correlation(batch: EnsembleBatch, out: str | Path, formats=("png",)) -> list[Path]:
    """``N x N`` Pearson correlations across the batch: of the Q-values and of the residuals.

    Residuals are the members' deviations from the ensemble mean at each pair
    (the quantity of :func:`torchrl_spqr.diagnostics.residual_correlation`); for
    independent members their off-diagonal correlation is ``-1/(N-1)``.
    """

    plt = _mpl()
    q = batch.q.double()
    n = q.shape[0]
    cq = _corr(q)
    cr = _corr(q - q.mean(0, keepdim=True))
    stats = D.residual_correlation(q)
    off = ~torch.eye(n, dtype=torch.bool)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 6.4), layout="constrained")
    lo_q = float(cq[off].min())
    vr = max(float(cr[off].abs().max()), 1e-3)
    panels = [
        (
            axes[0],
            cq,
            "viridis",
            min(lo_q, 0.999),
            1.0,
            f"Q-values\nmean off-diagonal {float(cq[off].mean()):.3f}",
        ),
        (
            axes[1],
            cr,
            "RdBu_r",
            -vr,
            vr,
            f"residuals (deviations from the ensemble mean)\nmean off-diagonal "
            f"{float(stats['mean_pairwise_corr']):.3f} (independent: {-1 / (n - 1):.3f}), "
            f"MP ratio {float(stats['mp_ratio']):.2f}",
        ),
    ]
    for ax, mat, cmap, vmin, vmax, title in panels:
        im = ax.imshow(mat.numpy(), cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("member")
        ax.set_ylabel("member")
        ticks = list(range(n)) if n <= 12 else list(range(0, n, max(1, n // 10)))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        cb = fig.colorbar(im, ax=ax, shrink=0.9)
        cb.set_label("Pearson correlation across the batch")
        if n <= 10:
            for i in range(n):
                for j in range(n):
                    v = float(mat[i, j])
                    r, g, b, _ = im.cmap(im.norm(v))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if dark else "k",
                    )  # fmt: skip
    meta = batch.meta
    fig.suptitle(
        f"{batch.label}: member correlations, N={n}, {q.shape[1]} pairs "
        f"{_pairs_text(batch.pairs)}\nstates: {batch.source}; {meta.get('env', '')}",
        fontsize=10,
    )
    return _save(fig, Path(out), formats)
