"""Test-suite root: tests are grouped by the package's roles (functional, modules, objectives,
data, training, analysis, scripts). This folder is put on ``sys.path`` (pytest's rootdir
conftest), so every test imports the shared builders as ``from _helpers import ...``.

Markers by folder, for choosing a subset (the default run, ``python -m pytest``, runs
everything except ``slow``, and so does CI; ``make test-slow`` runs ``slow``, with the
benchmarks):

- ``scripts``: end-to-end runs of the sota scripts, examples and experiments
  (``tests/scripts/``); ``python -m pytest -m "not scripts"`` is the quick unit run;
- ``results``: the README's learning numbers regenerated from the committed run folders
  (``tests/analysis/test_learning_results.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(_HERE)
        if rel.parts[0] == "scripts":
            item.add_marker(pytest.mark.scripts)
        if rel.name == "test_learning_results.py":
            item.add_marker(pytest.mark.results)
