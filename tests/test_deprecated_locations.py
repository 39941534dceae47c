"""The old flat locations (issue 17) still give the moved objects, with a ``FutureWarning``.

Each row of :data:`MOVED` is ``(old module, name, new module)``: ``old.name`` must be the
very object ``new.name`` and warn, naming the new location, that the old one goes away in
the next release. Add a row for every public name a restructuring moves.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

#: (old module, public name, the module that holds it now)
MOVED: list[tuple[str, str, str]] = [
    # torchrl_spqr/ensemble.py -> torchrl_spqr/modules/ensemble.py
    ("torchrl_spqr.ensemble", "QEnsemble", "torchrl_spqr.modules.ensemble"),
    ("torchrl_spqr.ensemble", "BatchedMLP", "torchrl_spqr.modules.ensemble"),
    ("torchrl_spqr.ensemble", "make_q_member", "torchrl_spqr.modules.ensemble"),
    ("torchrl_spqr.ensemble", "init_linear_stack_", "torchrl_spqr.modules.ensemble"),
    ("torchrl_spqr.ensemble", "INIT_SCHEMES", "torchrl_spqr.modules.ensemble"),
    # torchrl_spqr/loss.py -> torchrl_spqr/objectives/spqr.py
    ("torchrl_spqr.loss", "SPQRLoss", "torchrl_spqr.objectives.spqr"),
    ("torchrl_spqr.loss", "PAIRS", "torchrl_spqr.objectives.spqr"),
    # torchrl_spqr/objectives/ensemble.py -> one module per loss
    ("torchrl_spqr.objectives.ensemble", "SACNLoss", "torchrl_spqr.objectives.sac_n"),
    ("torchrl_spqr.objectives.ensemble", "ReferenceREDQLoss", "torchrl_spqr.objectives.redq"),
    ("torchrl_spqr.objectives.ensemble", "EDACLoss", "torchrl_spqr.objectives.edac"),
    ("torchrl_spqr.objectives.ensemble", "CQLNLoss", "torchrl_spqr.objectives.cql_n"),
    ("torchrl_spqr.objectives.ensemble", "mbpo_target_entropy", "torchrl_spqr.objectives.redq"),
    ("torchrl_spqr.objectives.ensemble", "MBPO_TARGET_ENTROPY", "torchrl_spqr.objectives.redq"),
    # torchrl_spqr/multiagent.py -> modules/multiagent.py (critic), training/multiagent.py (builders)
    ("torchrl_spqr.multiagent", "GROUP", "torchrl_spqr.modules.multiagent"),
    ("torchrl_spqr.multiagent", "MultiAgentQNet", "torchrl_spqr.modules.multiagent"),
    ("torchrl_spqr.multiagent", "expand_done_to_agents", "torchrl_spqr.training.multiagent"),
    ("torchrl_spqr.multiagent", "validate_config", "torchrl_spqr.training.multiagent"),
    ("torchrl_spqr.multiagent", "make_environment", "torchrl_spqr.training.multiagent"),
    ("torchrl_spqr.multiagent", "make_actor", "torchrl_spqr.training.multiagent"),
    ("torchrl_spqr.multiagent", "make_critics", "torchrl_spqr.training.multiagent"),
    ("torchrl_spqr.multiagent", "make_loss_module", "torchrl_spqr.training.multiagent"),
    ("torchrl_spqr.multiagent", "make_optimizers", "torchrl_spqr.training.multiagent"),
    ("torchrl_spqr.multiagent", "make_replay_buffer", "torchrl_spqr.training.multiagent"),
    ("torchrl_spqr.multiagent", "make_collector", "torchrl_spqr.training.multiagent"),
    ("torchrl_spqr.multiagent", "evaluate", "torchrl_spqr.training.multiagent"),
    # torchrl_spqr/datasets.py -> the package torchrl_spqr/data (and training/restore.py)
    ("torchrl_spqr.datasets", "D4RL_ENV_IDS", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "D4RL_REF_SCORES", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "DOWNLOAD_TIMEOUT_S", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "DatasetCorruptedError", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "DatasetUnavailableError", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "KINDS", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "OfflineData", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "build_dataset", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "d4rl_env_id", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "d4rl_env_kwargs", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "d4rl_ref_scores", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "load_offline_dataset", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "load_policy_from_run", "torchrl_spqr.training.restore"),
    ("torchrl_spqr.datasets", "main", "torchrl_spqr.data.cli"),
    ("torchrl_spqr.datasets", "minari_datasets_path", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "normalized_score", "torchrl_spqr.data"),
    ("torchrl_spqr.datasets", "parse_d4rl_id", "torchrl_spqr.data"),
    # torchrl_spqr/plot.py -> the package torchrl_spqr/analysis (one module per role)
    ("torchrl_spqr.plot", "main", "torchrl_spqr.analysis.cli"),
    ("torchrl_spqr.plot", "EnsembleBatch", "torchrl_spqr.analysis.critics"),
    ("torchrl_spqr.plot", "checkpoint_q_values", "torchrl_spqr.analysis.critics"),
    ("torchrl_spqr.plot", "DIAGNOSTICS", "torchrl_spqr.analysis.figures"),
    ("torchrl_spqr.plot", "plot_diagnostics", "torchrl_spqr.analysis.figures"),
    ("torchrl_spqr.plot", "plot_effects", "torchrl_spqr.analysis.figures"),
    ("torchrl_spqr.plot", "plot_groups", "torchrl_spqr.analysis.figures"),
    ("torchrl_spqr.plot", "plot_learning_curves", "torchrl_spqr.analysis.figures"),
    ("torchrl_spqr.plot", "plot_member_correlation", "torchrl_spqr.analysis.figures"),
    ("torchrl_spqr.plot", "plot_run", "torchrl_spqr.analysis.figures"),
    ("torchrl_spqr.plot", "plot_spectrum", "torchrl_spqr.analysis.figures"),
    ("torchrl_spqr.plot", "SUMMARY_DIAGNOSTICS", "torchrl_spqr.analysis.report"),
    ("torchrl_spqr.plot", "diagnostics_rows", "torchrl_spqr.analysis.report"),
    ("torchrl_spqr.plot", "diagnostics_table", "torchrl_spqr.analysis.report"),
    ("torchrl_spqr.plot", "effect_pairs", "torchrl_spqr.analysis.report"),
    ("torchrl_spqr.plot", "effects_table", "torchrl_spqr.analysis.report"),
    ("torchrl_spqr.plot", "paired_effects", "torchrl_spqr.analysis.report"),
    ("torchrl_spqr.plot", "summary_rows", "torchrl_spqr.analysis.report"),
    ("torchrl_spqr.plot", "summary_table", "torchrl_spqr.analysis.report"),
    ("torchrl_spqr.plot", "check_run", "torchrl_spqr.analysis.runs"),
    ("torchrl_spqr.plot", "find_runs", "torchrl_spqr.analysis.runs"),
    ("torchrl_spqr.plot", "group_name", "torchrl_spqr.analysis.runs"),
    ("torchrl_spqr.plot", "group_runs", "torchrl_spqr.analysis.runs"),
    ("torchrl_spqr.plot", "read_metrics", "torchrl_spqr.analysis.runs"),
    ("torchrl_spqr.plot", "run_outcome", "torchrl_spqr.analysis.runs"),
    ("torchrl_spqr.plot", "GroupCurve", "torchrl_spqr.analysis.stats"),
    ("torchrl_spqr.plot", "group_curve", "torchrl_spqr.analysis.stats"),
    ("torchrl_spqr.plot", "mean_ci", "torchrl_spqr.analysis.stats"),
]

OLD_MODULES = sorted({old for old, _, _ in MOVED})


@pytest.mark.parametrize(("old", "name", "new"), MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_old_location_gives_the_same_object_with_a_future_warning(old, name, new):
    old_mod = importlib.import_module(old)
    new_obj = getattr(importlib.import_module(new), name)
    with pytest.warns(FutureWarning) as rec:
        obj = getattr(old_mod, name)
    assert obj is new_obj
    msgs = [str(w.message) for w in rec if issubclass(w.category, FutureWarning)]
    assert len(msgs) == 1, msgs
    assert f"{old}.{name} moved to {new}" in msgs[0], msgs[0]
    assert "removed in the next release" in msgs[0], msgs[0]
    assert rec[0].filename == __file__  # the warning points at the user's line
    assert name in dir(old_mod) and name in old_mod.__all__


@pytest.mark.parametrize(("old", "name", "new"), MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_from_import_at_the_old_location_warns(old, name, new):
    namespace: dict = {}
    with pytest.warns(FutureWarning, match=f"moved to {new}"):
        exec(f"from {old} import {name}", namespace)  # noqa: S102
    assert namespace[name] is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old", OLD_MODULES)
def test_old_location_refuses_unknown_names(old):
    mod = importlib.import_module(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown name raises, and warns nothing
        with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
            mod.NoSuchName  # noqa: B018
    moved = {name for o, name, _ in MOVED if o == old}
    assert set(mod.__all__) == moved, "every moved public name has a row in MOVED"


def test_the_package_imports_only_new_locations():
    """Importing the package and its new modules emits no FutureWarning (no stale import)."""
    new_modules = sorted({new for _, _, new in MOVED} | {"torchrl_spqr", "torchrl_spqr.modules"})
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in new_modules)
    res = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
