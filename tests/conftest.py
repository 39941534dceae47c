"""Test-suite root: tests are grouped by the package's roles (functional, modules, objectives,
data, training, analysis, scripts). This folder is put on ``sys.path`` (pytest's rootdir
conftest), so every test imports the shared builders as ``from _helpers import ...``."""
