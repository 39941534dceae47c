"""Statistics over seeds: means and confidence intervals, from ``scipy.stats``.

- Student-t interval of the mean (``scipy.stats.t.ppf``): ``mean +- t_{(1+level)/2, S-1}
  * sd / sqrt(S)`` with the sample standard deviation (ddof 1) over ``S`` seeds;
- percentile bootstrap of the mean (``scipy.stats.bootstrap(method="percentile")``),
  seeded, so a figure drawn twice is the same figure;
- :func:`group_curve`: the mean and band of one metric over the runs of an arm, runs
  aligned on their logged steps (or interpolated onto the steps all of them cover).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from torchrl_spqr.analysis.runs import series, step_key

__all__ = [
    "GroupCurve",
    "ci_text",
    "group_curve",
    "mean_ci",
    "mean_sd_text",
    "t_quantile",
    "trailing_mean",
]

METHODS = ("t", "bootstrap")


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as err:
        raise ImportError(
            "Confidence intervals need scipy: pip install 'torchrl-spqr[scripts]'."
        ) from err
    return stats


def t_quantile(level: float, df: int) -> float:
    """``t_{(1+level)/2, df}``: the two-sided ``level`` quantile of Student's t with ``df``."""
    return float(_scipy_stats().t.ppf(0.5 + level / 2, df))


def mean_ci(
    values, level: float = 0.95, method: str = "t", *, resamples: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds (axis 0) and a ``level`` confidence interval of that mean.

    ``method="t"``: ``mean +- t_{(1+level)/2, S-1} * sd / sqrt(S)`` (sd with ddof 1);
    ``method="bootstrap"``: percentile bootstrap of the mean (``scipy.stats.bootstrap``,
    ``resamples`` draws, seeded by ``seed``). With one seed the interval is the mean itself.
    """
    if method not in METHODS:
        raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1) (e.g. 0.95), got {level}.")
    v = np.asarray(values, dtype=float)
    if v.ndim == 1:
        v = v[:, None]
    s = v.shape[0]
    mean = v.mean(0)
    if s < 2:
        return mean, mean.copy(), mean.copy()
    if method == "t":
        half = t_quantile(level, s - 1) * v.std(0, ddof=1) / np.sqrt(s)
        return mean, mean - half, mean + half
    res = _scipy_stats().bootstrap(
        (v,),
        np.mean,
        axis=0,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return mean, np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)


def ci_text(method: str, level: float) -> str:
    """The band's description, as figure captions print it."""
    pct = f"{100 * level:g}%"
    if method == "t":
        return f"{pct} Student-t confidence interval of the mean over seeds"
    return f"{pct} percentile-bootstrap confidence interval of the mean over seeds"


def mean_sd_text(values: list[float], digits: int = 1, signed: bool = False) -> str:
    """``"mean +- sd"`` of ``values`` (sd over them, ddof 1; the mean alone for one value),
    ``digits`` decimals, the mean with its sign if ``signed``: the tables' cells.

    Example::

        >>> mean_sd_text([1.0, 2.0, 3.0]), mean_sd_text([-0.5], 3, signed=True)
        ('2.0 +- 1.0', '-0.500')
    """
    import statistics

    spread = f" +- {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):{'+' if signed else ''}.{digits}f}{spread}"


def trailing_mean(y: list[float], window: int) -> list[float]:
    """Trailing moving average of ``y`` over ``window`` points (``y`` itself for window 1)."""
    if window <= 1 or len(y) < 2:
        return y
    out, acc = [], []
    for v in y:  # trailing moving average
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


@dataclass
class GroupCurve:
    """Mean and confidence band of one metric over the runs of a group (see :func:`group_curve`)."""

    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    seeds: int
    step_key: str
    interpolated: bool = False
    values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def group_curve(
    runs_rows: list[list[dict[str, float]]],
    key: str,
    *,
    level: float = 0.95,
    method: str = "t",
    smooth: int = 1,
) -> GroupCurve | None:
    """Mean and confidence band of ``key`` over the runs of one group.

    Runs logged at the same steps are aligned exactly; otherwise each run is
    linearly interpolated onto the union of steps inside the range all runs cover.
    Runs without ``key`` are left out; ``None`` if none has it.
    """
    curves = []
    for rows in runs_rows:
        x, y = series(rows, key)
        if x:
            curves.append((np.asarray(x, float), np.asarray(trailing_mean(y, smooth), float)))
    if not curves:
        return None
    xkey = step_key(runs_rows[0])
    common = sorted(set.intersection(*(set(x.tolist()) for x, _ in curves)))
    union = sorted(set().union(*(set(x.tolist()) for x, _ in curves)))
    interpolated = False
    if len(common) == len(union) or len(curves) == 1:
        steps = np.asarray(common if len(curves) > 1 else union, float)
        vals = np.stack([[dict(zip(x.tolist(), y.tolist()))[t] for t in steps] for x, y in curves])
    else:
        lo_x = max(x[0] for x, _ in curves)
        hi_x = min(x[-1] for x, _ in curves)
        steps = np.asarray([t for t in union if lo_x <= t <= hi_x], float)
        if steps.size == 0:
            return None
        vals = np.stack([np.interp(steps, x, y) for x, y in curves])
        interpolated = True
    mean, lo, hi = mean_ci(vals, level, method)
    return GroupCurve(steps, mean, lo, hi, len(curves), xkey, interpolated, vals)
