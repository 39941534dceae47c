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
from _helpers import package_modules

ROOT = Path(__file__).resolve().parents[1]
#: the modules whose source holds a docstring example (``__main__`` modules run a command)
WITH_EXAMPLES = {
    name: path
    for name, path in sorted(package_modules().items())
    if path.stem != "__main__" and ">>>" in path.read_text()
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", WITH_EXAMPLES)
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
    where = WITH_EXAMPLES[name].relative_to(ROOT)
    assert failed == 0, (
        f"{failed} failing docstring example(s) in {name}; see them with "
        f"python -m pytest --doctest-modules {where}"
    )
