"""Statistics, figures and reports from run folders (the package's analysis layer).

- :mod:`~torchrl_spqr.analysis.runs`: reading ``metrics.csv``, finding and grouping runs;
- :mod:`~torchrl_spqr.analysis.stats`: means and confidence intervals over seeds
  (``scipy.stats``: Student-t, percentile bootstrap), learning-curve bands;
- :mod:`~torchrl_spqr.analysis.report`: summary, diagnostics and paired-effect tables;
- :mod:`~torchrl_spqr.analysis.figures`: learning curves, diagnostics, effects, spectra;
- :mod:`~torchrl_spqr.analysis.critics`: a saved ensemble's Q-values on a batch;
- :mod:`~torchrl_spqr.analysis.bias`: a saved ensemble's Q bias against Monte Carlo returns;
- :mod:`~torchrl_spqr.analysis.evaluation`: a saved policy's return over many episodes;
- :mod:`~torchrl_spqr.analysis.cli`: ``python -m torchrl_spqr.analysis RUN_DIR ...``.

Training never imports this package; the scripts wrap their loop in
:func:`learning_curves_at_exit`, which calls :func:`plot_run` when the loop exits.
"""

from torchrl_spqr.analysis.bias import BiasEstimate, q_estimation_bias
from torchrl_spqr.analysis.critics import EnsembleBatch, checkpoint_q_values
from torchrl_spqr.analysis.evaluation import ReturnEstimate, checkpoint_return, return_effects
from torchrl_spqr.analysis.figures import (
    DIAGNOSTICS,
    learning_curves_at_exit,
    plot_diagnostics,
    plot_effects,
    plot_groups,
    plot_learning_curves,
    plot_member_correlation,
    plot_run,
    plot_spectrum,
)
from torchrl_spqr.analysis.report import (
    SUMMARY_DIAGNOSTICS,
    diagnostics_rows,
    diagnostics_table,
    effect_pairs,
    effects_table,
    paired_effects,
    run_effect_stats,
    summary_rows,
    summary_table,
)
from torchrl_spqr.analysis.runs import (
    check_run,
    find_runs,
    group_name,
    group_runs,
    read_metrics,
    run_outcome,
    runs_by_seed,
    seed_of,
)
from torchrl_spqr.analysis.stats import GroupCurve, group_curve, mean_ci, t_quantile

__all__ = [
    "DIAGNOSTICS",
    "SUMMARY_DIAGNOSTICS",
    "BiasEstimate",
    "EnsembleBatch",
    "GroupCurve",
    "ReturnEstimate",
    "check_run",
    "q_estimation_bias",
    "checkpoint_q_values",
    "checkpoint_return",
    "diagnostics_rows",
    "diagnostics_table",
    "effect_pairs",
    "effects_table",
    "find_runs",
    "group_curve",
    "group_name",
    "group_runs",
    "learning_curves_at_exit",
    "mean_ci",
    "paired_effects",
    "plot_diagnostics",
    "plot_effects",
    "plot_groups",
    "plot_learning_curves",
    "plot_member_correlation",
    "plot_run",
    "plot_spectrum",
    "read_metrics",
    "return_effects",
    "run_effect_stats",
    "run_outcome",
    "runs_by_seed",
    "seed_of",
    "summary_rows",
    "summary_table",
    "t_quantile",
]
