"""Every docstring example in the package runs and prints what it shows (``doctest``).

The brief asks for docstrings with runnable examples; this keeps them so. Examples that
need a trained agent or a dataset mark their lines ``# doctest: +SKIP``.
"""

from __future__ import annotations

import doctest
import importlib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "torchrl_spqr"


def _module_names() -> list[str]:
    names = []
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def _with_examples() -> list[str]:
    return [n for n in _module_names() if ">>>" in _source(n)]


def _path(name: str) -> Path:
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _source(name: str) -> str:
    return _path(name).read_text()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", _with_examples())
def test_docstring_examples_run(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecated locations warn on import
        module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    assert tests, f"{name} has '>>>' in its source but doctest found no example"
    for test in tests:
        runner.run(test, out=lambda text: None)
    failed = runner.summarize(verbose=False).failed
    where = _path(name).relative_to(ROOT)
    assert failed == 0, (
        f"{failed} failing docstring example(s) in {name}; see them with "
        f"python -m pytest --doctest-modules {where}"
    )
