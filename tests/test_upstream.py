"""The TorchRL patch series in ``upstream/``: what can be checked without network or a TorchRL checkout.

- every ``upstream/*.patch`` parses as a git patch (``git apply --stat``), the
  series is numbered 0001..N without gaps, and it touches the expected files;
- ``upstream/README.md`` records the base commit;
- the SPQR math that patch 0002 adds (``torchrl/objectives/spqr.py``, a new,
  self-contained file: only ``torch`` and the standard library) gives the same
  values and gradients as :func:`torchrl_spqr.functional.spqr_kl`;
- the Minari fix (patch 0001) removes a line that the installed TorchRL still has,
  and the library part of the series applies to the installed TorchRL 0.14.1.

Patch 0004 (``SPQRLoss``) appends to the same file and imports TorchRL internals,
so it is not imported here; its tests (``test/objectives/test_spqr.py``) run
against a patched TorchRL as ``upstream/README.md`` describes.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from torchrl_spqr import functional as F

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ROOT / "upstream"
BASE_COMMIT = "6e18e35b2c68be1a56afebfb0676d217925114cd"
PATCHES = sorted(UPSTREAM.glob("*.patch"))

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git not found")


def _patch(prefix: str) -> Path:
    (path,) = [p for p in PATCHES if p.name.startswith(prefix)]
    return path


def _git_apply(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "apply", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def _added_file(patch: Path, path: str) -> str:
    """The content of a file that ``patch`` creates (``new file mode``), from its ``+`` lines."""
    text = patch.read_text()
    start = text.index(f"diff --git a/{path} b/{path}\n")
    section = text[start:]
    nxt = section.find("\ndiff --git ", 1)
    section = section if nxt < 0 else section[: nxt + 1]
    assert "new file mode" in section.split("@@", 1)[0], f"{path} is not created by {patch.name}"
    body = section.split("\n@@ ", 1)[1].split("\n", 1)[1]  # after the (single) hunk header
    lines = []
    for line in body.splitlines():
        if line.startswith("+"):
            lines.append(line[1:])
        elif line.startswith("\\"):  # "\ No newline at end of file"
            continue
        else:
            break  # the "-- " signature separator or the next section
    return "\n".join(lines) + "\n"


def test_series_is_numbered_and_parses(tmp_path):
    assert len(PATCHES) >= 6, [p.name for p in PATCHES]
    assert [p.name[:4] for p in PATCHES] == [f"{i:04d}" for i in range(1, len(PATCHES) + 1)]
    touched: set[str] = set()
    for patch in PATCHES:
        res = _git_apply("--numstat", str(patch), cwd=tmp_path)
        assert res.returncode == 0, f"{patch.name}: {res.stderr}"
        files = [line.split("\t")[2] for line in res.stdout.splitlines() if line.strip()]
        assert files, patch.name
        touched.update(files)
        assert _git_apply("--stat", str(patch), cwd=tmp_path).returncode == 0
        assert patch.read_text().startswith("From "), patch.name  # git format-patch output
    assert {
        "torchrl/data/datasets/minari_data.py",
        "test/libs/test_datasets.py",
        "torchrl/objectives/spqr.py",
        "torchrl/objectives/__init__.py",
        "torchrl/objectives/sac.py",
        "torchrl/objectives/redq.py",
        "torchrl/objectives/td3.py",
        "docs/source/reference/objectives_actorcritic.rst",
        "test/objectives/test_spqr.py",
    } <= touched


def test_readme_records_the_base_commit():
    readme = (UPSTREAM / "README.md").read_text()
    assert BASE_COMMIT in readme
    hashes = set(re.findall(r"\b[0-9a-f]{40}\b", readme))
    assert hashes == {BASE_COMMIT}, hashes  # one base, named once or more
    for patch in PATCHES:
        assert patch.name in readme, f"{patch.name} is not described in upstream/README.md"


@pytest.fixture(scope="module")
def upstream_spqr(tmp_path_factory):
    src = _added_file(_patch("0002"), "torchrl/objectives/spqr.py")
    imports = {
        m.group(1).split(".")[0]
        for m in re.finditer(r"^\s*(?:from|import) ([\w.]+)", src, re.MULTILINE)
    }
    assert imports <= {"__future__", "math", "warnings", "functools", "typing", "torch"}, imports
    path = tmp_path_factory.mktemp("upstream") / "upstream_spqr.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("upstream_spqr", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["upstream_spqr"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("upstream_spqr", None)


@pytest.mark.parametrize("n", [3, 6, 10, 14, 15])
@pytest.mark.parametrize("density", ["paper", "corrected"])
@pytest.mark.parametrize("filling", ["ordered", "random"])
def test_patch_math_equals_package(upstream_spqr, n, density, filling):
    torch.manual_seed(n)
    q = torch.randn(n, 32, 1, dtype=torch.float64) * 5 + 3
    q_up = q.clone().requires_grad_(True)
    q_pkg = q.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for reduction in ("none", "mean", "sum"):
            up = upstream_spqr.spqr_kl(
                q_up,
                filling=filling,
                density=density,
                reduction=reduction,
                generator=torch.Generator().manual_seed(7),
            )
            pkg = F.spqr_kl(
                q_pkg,
                filling=filling,
                density=density,
                reduction=reduction,
                generator=torch.Generator().manual_seed(7),
            )
            assert torch.equal(up, pkg), (reduction, up, pkg)
    (g_up,) = torch.autograd.grad(up, q_up)
    (g_pkg,) = torch.autograd.grad(pkg, q_pkg)
    assert torch.equal(g_up, g_pkg)


def test_patch_math_defaults_and_pieces(upstream_spqr):
    up = upstream_spqr
    import inspect

    for name in ("spqr_kl", "soft_semicircle_density", "spectral_kl"):
        a = inspect.signature(getattr(up, name)).parameters
        b = inspect.signature(getattr(F, name)).parameters
        for key in ("rho", "eps", "density", "filling", "reduction"):
            if key in b:
                assert a[key].default == b[key].default, (name, key)
    assert [up.spqr_matrix_side(n) for n in (3, 5, 6, 10, 55)] == [
        F.matrix_side(n) for n in (3, 5, 6, 10, 55)
    ]
    q = torch.randn(10, 16)
    assert torch.equal(up.ensemble_to_matrices(q), F.ensemble_to_matrices(q))
    mat = F.ensemble_to_matrices(q)
    assert torch.equal(up.normalize_matrices(mat), F.normalize_matrices(mat))
    assert torch.equal(up.spqr_eigenvalues(q), F.spqr_eigenvalues(q))
    x = torch.linspace(-3, 3, 101)
    for density in ("paper", "corrected"):
        assert torch.equal(
            up.soft_semicircle_density(x, density=density),
            F.soft_semicircle_density(x, density=density),
        )
    assert torch.isfinite(up.spqr_kl(torch.ones(6, 4)))
    with pytest.raises(ValueError, match="at least 3"):
        up.spqr_kl(torch.randn(2, 4))


def test_minari_fix_targets_the_installed_torchrl():
    import torchrl.data.datasets.minari_data as minari_data

    patch = _patch("0001").read_text()
    removed = [
        ln[1:].strip()
        for ln in patch.splitlines()
        if ln.startswith("-") and not ln.startswith("---")
    ]
    added = [
        ln[1:].strip()
        for ln in patch.splitlines()
        if ln.startswith("+") and not ln.startswith("+++")
    ]
    assert "td_data = td_data.memmap_like(self.data_path_root)" in removed
    assert "td_data = td_data.memmap(self.data_path_root)" in added
    installed = Path(minari_data.__file__).read_text()
    if "td_data = td_data.memmap_like(self.data_path_root)" not in installed:
        pytest.skip("the installed TorchRL no longer has the memmap_like line (fixed upstream?)")


def test_library_part_applies_to_the_installed_torchrl(tmp_path):
    import torchrl

    if torchrl.__version__ != "0.14.1":
        pytest.skip(f"checked against torchrl 0.14.1, installed {torchrl.__version__}")
    pkg = Path(torchrl.__file__).resolve().parent
    # a copy of the files the series touches (tmp_path is outside any git work tree)
    shutil.copytree(pkg / "objectives", tmp_path / "torchrl" / "objectives")
    (tmp_path / "torchrl" / "data" / "datasets").mkdir(parents=True)
    shutil.copy(
        pkg / "data" / "datasets" / "minari_data.py",
        tmp_path / "torchrl" / "data" / "datasets" / "minari_data.py",
    )
    for patch in PATCHES:  # in order: 0004 extends the file 0002 creates
        res = _git_apply("--include=torchrl/*", "--exclude=*", str(patch), cwd=tmp_path)
        assert res.returncode == 0, f"{patch.name}: {res.stderr}"
    assert "class SPQRLoss(LossModule)" in (tmp_path / "torchrl/objectives/spqr.py").read_text()
    assert (
        "memmap(self.data_path_root)"
        in (tmp_path / "torchrl/data/datasets/minari_data.py").read_text()
    )
