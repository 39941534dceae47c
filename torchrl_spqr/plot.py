"""Deprecated location of :mod:`torchrl_spqr.analysis` (figures, tables and statistics).

Every public name of the old ``torchrl_spqr.plot`` is served from its new home with a
``FutureWarning``; this module will be removed in the next release. The command line
``python -m torchrl_spqr.plot ...`` keeps working, without a warning: it runs
``python -m torchrl_spqr.analysis ...``.
"""

from __future__ import annotations

from torchrl_spqr._deprecation import moved_names

#: old name -> module of :mod:`torchrl_spqr.analysis` that holds it now
_MOVED = {
    **dict.fromkeys(
        (
            "read_metrics",
            "find_runs",
            "group_name",
            "group_runs",
            "run_outcome",
            "check_run",
        ),
        "torchrl_spqr.analysis.runs",
    ),
    **dict.fromkeys(("mean_ci", "group_curve", "GroupCurve"), "torchrl_spqr.analysis.stats"),
    **dict.fromkeys(
        (
            "plot_run",
            "plot_groups",
            "plot_learning_curves",
            "plot_diagnostics",
            "plot_effects",
            "plot_spectrum",
            "plot_member_correlation",
            "DIAGNOSTICS",
        ),
        "torchrl_spqr.analysis.figures",
    ),
    **dict.fromkeys(
        (
            "summary_rows",
            "summary_table",
            "diagnostics_rows",
            "diagnostics_table",
            "effect_pairs",
            "paired_effects",
            "effects_table",
            "SUMMARY_DIAGNOSTICS",
        ),
        "torchrl_spqr.analysis.report",
    ),
    **dict.fromkeys(("EnsembleBatch", "checkpoint_q_values"), "torchrl_spqr.analysis.critics"),
    "main": "torchrl_spqr.analysis.cli",
}

__all__, __getattr__, __dir__ = moved_names(__name__, _MOVED)


if __name__ == "__main__":
    from torchrl_spqr.analysis.cli import main

    main(prog="python -m torchrl_spqr.plot")
