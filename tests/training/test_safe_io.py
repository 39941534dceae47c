"""A run folder cannot execute code: every file read back is loaded without unpickling.

A pickle that would create a marker file is planted in a real checkpoint's replay
buffer (where ``TensorDict.load_memmap`` would unpickle it), in its state file, and as a
stray file; resume, the dataset builder's ``--source-run`` and the plot tool's
``--checkpoint`` must refuse it with an error naming the file, and the marker must not
exist.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, ReplayBuffer

from torchrl_spqr import safe_io
from torchrl_spqr.safe_io import CorruptFileError, UnsafeFileError
from torchrl_spqr.training import checkpoint as C

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[2]


class Boom:
    """Unpickling this creates ``marker`` (stands for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _nontensor_poison(buf: Path, marker: Path, key: str = "note") -> None:
    """Add a non-tensor entry to the memmap ``buf`` whose ``other.pickle`` runs Boom."""
    meta = json.loads((buf / "meta.json").read_text())
    meta[key] = {"type": "NonTensorData"}
    (buf / "meta.json").write_text(json.dumps(meta))
    sub = buf / key
    sub.mkdir()
    (sub / "meta.json").write_text(
        json.dumps(
            {
                "_type": "<class 'tensordict.tensorclass.NonTensorData'>",
                "_is_non_tensor": True,
                "_metadata": None,
            }
        )
    )
    with (sub / "other.pickle").open("wb") as f:
        pickle.dump({"data": Boom(marker)}, f)


def _poison_checkpoint(ck: Path, marker: Path, how: str) -> None:
    buf = ck / "buffer"
    if how == "nontensor":  # what tensordict itself would unpickle
        _nontensor_poison(buf, marker)
    elif how == "stray":  # a pickle file lying in the folder
        with (buf / "extra.pkl").open("wb") as f:
            pickle.dump(Boom(marker), f)
    elif how == "state":  # the state file itself
        torch.save({"counters": {"frames": 1}, "evil": Boom(marker)}, ck / "state.pt")
    else:  # pragma: no cover
        raise ValueError(how)
    # the attacker also rewrites the manifest: the safe loaders, not the checksum, refuse it
    (ck / C.MANIFEST).unlink(missing_ok=True)
    C._write_manifest(ck)


def _small_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    buf = ReplayBuffer(storage=LazyTensorStorage(20), batch_size=4)
    buf.extend(TensorDict({"obs": torch.randn(10, 3), "next": {"r": torch.randn(10, 1)}}, [10]))
    C.save_checkpoint(run, {"counters": {"frames": 10}}, buf)
    return run


def test_tensordict_default_would_execute_the_poison(tmp_path):
    """Sanity: the planted pickle is live (tensordict's default load runs it)."""
    run = _small_run(tmp_path)
    marker = tmp_path / "MARKER"
    _poison_checkpoint(run / "checkpoint", marker, "nontensor")
    with pytest.warns(FutureWarning):
        TensorDict.load_memmap(run / "checkpoint" / "buffer")
    assert marker.exists()


@pytest.mark.parametrize(
    "how,name", [("nontensor", "note"), ("stray", "extra.pkl"), ("state", "state.pt")]
)
def test_load_checkpoint_refuses_pickles(tmp_path, how, name):
    run = _small_run(tmp_path)
    marker = tmp_path / "MARKER"
    _poison_checkpoint(run / "checkpoint", marker, how)
    fresh = ReplayBuffer(storage=LazyTensorStorage(20), batch_size=4)
    with pytest.raises((UnsafeFileError, C.CheckpointError), match=name):
        C.load_checkpoint(run, fresh)
    with pytest.raises((UnsafeFileError, C.CheckpointError), match=name):
        C.load_checkpoint_data(run)
    assert not marker.exists()
    assert len(fresh) == 0


def test_checkpoint_without_manifest_is_checked_too(tmp_path):
    """A checkpoint of an older version (no manifest) is still loaded safely."""
    run = _small_run(tmp_path)
    marker = tmp_path / "MARKER"
    _nontensor_poison(run / "checkpoint" / "buffer", marker)
    (run / "checkpoint" / C.MANIFEST).unlink()
    with pytest.raises(UnsafeFileError, match="NonTensorData"):
        C.load_checkpoint(run, ReplayBuffer(storage=LazyTensorStorage(20), batch_size=4))
    assert not marker.exists()


def test_safe_io_refusals(tmp_path):
    td = TensorDict({"a": torch.arange(6.0), "n": {"b": torch.ones(6, 2)}}, [6])
    td.memmap(tmp_path / "m", num_threads=0)
    out = safe_io.load_memmap(tmp_path / "m")
    torch.testing.assert_close(out["n", "b"], td["n", "b"])
    # a truncated tensor file (tensordict alone would fill it with zeros)
    bad = tmp_path / "t"
    shutil.copytree(tmp_path / "m", bad)
    (bad / "n" / "b.memmap").write_bytes((bad / "n" / "b.memmap").read_bytes()[:10])
    with pytest.raises(CorruptFileError, match=r"b\.memmap.*10 bytes"):
        safe_io.load_memmap(bad)
    # a missing tensor file (tensordict alone would drop the entry)
    miss = tmp_path / "x"
    shutil.copytree(tmp_path / "m", miss)
    (miss / "a.memmap").unlink()
    with pytest.raises(CorruptFileError, match=r"a\.memmap is missing"):
        safe_io.load_memmap(miss)
    # a foreign type, a path-like key, a stray folder, a symlink
    # (a path-like key is looked up encoded, inside the folder: reported missing)
    for mutate, match in [
        (lambda d: _set_meta(d, "_type", "<class 'tensordict.tensorclass.NonTensorData'>"), "type"),
        (lambda d: _set_meta(d, "../evil", {"dtype": "torch.float32", "shape": [1]}), "evil"),
        (lambda d: _set_meta(d, "a", {"dtype": "os.system", "shape": [6]}), "dtype"),
        (lambda d: (d / "junk").mkdir(), "junk"),
        (lambda d: (d / "link.memmap").symlink_to(d / "a.memmap"), "symbolic link"),
    ]:
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path / "m", d)
        mutate(d)
        with pytest.raises((UnsafeFileError, CorruptFileError), match=match):
            safe_io.load_memmap(d)


def _set_meta(d: Path, key, value) -> None:
    meta = json.loads((d / "meta.json").read_text())
    meta[key] = value
    (d / "meta.json").write_text(json.dumps(meta))


def test_load_state_errors(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"x": Boom(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CorruptFileError, match=r"evil\.pt.*other than tensors"):
        safe_io.load_state(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CorruptFileError, match=r"empty\.pt is empty"):
        safe_io.load_state(tmp_path / "empty.pt")
    torch.save({"w": torch.randn(100)}, tmp_path / "cut.pt")
    raw = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError, match=r"cut\.pt.*truncated or corrupted"):
        safe_io.load_state(tmp_path / "cut.pt")


# ----------------------------------------------- a real run: resume, datasets, plot
@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A tiny sac_ens_spqr run (checkpoint with config and replay buffer)."""
    pytest.importorskip("hydra")
    from _helpers import load_script
    from hydra import compose, initialize_config_dir

    run = tmp_path_factory.mktemp("safe") / "run"
    with initialize_config_dir(
        config_dir=str(ROOT / "sota_scripts/sac_ens_spqr"), version_base="1.3"
    ):
        cfg = compose(config_name="config", overrides=TINY)
    load_script("sac_ens_spqr").train(cfg, run)
    return run, cfg


TINY = [
    "env=pendulum",
    "collector.init_random_frames=20",
    "collector.total_frames=40",
    "optim.batch_size=8",
    "replay_buffer.size=100",
    "network.hidden_sizes=[8,8]",
    "network.ensemble_size=3",
    "logger.log_interval=20",
    "logger.eval_interval=40",
    "logger.eval_episodes=1",
    "logger.progress=false",
    "logger.backend=none",
    "checkpoint.interval=20",
]


@pytest.fixture
def poisoned(real_run, tmp_path):
    src, cfg = real_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    marker = tmp_path / "MARKER"
    _poison_checkpoint(run / "checkpoint", marker, "nontensor")
    return run, cfg, marker


def test_resume_refuses_poisoned_buffer(poisoned):
    from _helpers import load_script
    from omegaconf import OmegaConf

    run, cfg, marker = poisoned
    cfg = OmegaConf.merge(cfg, {"resume": True, "collector": {"total_frames": 60}})
    with pytest.raises(UnsafeFileError, match="NonTensorData"):
        load_script("sac_ens_spqr").train(cfg, run)
    assert not marker.exists()
    assert (run / "checkpoint" / "buffer" / "note" / "other.pickle").exists()  # left as is


def test_dataset_source_run_refuses_poisoned_buffer(poisoned, tmp_path, monkeypatch):
    pytest.importorskip("minari")
    from torchrl_spqr.data import build_dataset
    from torchrl_spqr.training.restore import RunFolders, run_episodes

    run, _cfg, marker = poisoned
    with pytest.raises(UnsafeFileError, match="NonTensorData"):
        run_episodes(run)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    with pytest.raises((ValueError, UnsafeFileError), match="source-run.*NonTensorData"):
        build_dataset(
            "local/test/poison-v0", None, "medium-replay", source_run=str(run), runs=RunFolders()
        )
    assert not marker.exists()


def test_plot_checkpoint_refuses_poisoned_buffer(poisoned):
    pytest.importorskip("matplotlib")
    from torchrl_spqr import analysis

    run, _cfg, marker = poisoned
    with pytest.raises(UnsafeFileError, match="NonTensorData"):
        analysis.checkpoint_q_values(run, batch_size=8)
    assert not marker.exists()


def test_plot_example_checkpoint_refuses_pickle(tmp_path):
    pytest.importorskip("matplotlib")
    from torchrl_spqr import analysis

    run = tmp_path / "spqr_sac_ens_Pendulum-v1_N3_beta1.0_seed0"
    run.mkdir()
    marker = tmp_path / "MARKER"
    torch.save({"actor": {"w": Boom(marker)}, "loss": {}}, run / "checkpoint.pt")
    with pytest.raises(CorruptFileError, match=r"checkpoint\.pt"):
        analysis.checkpoint_q_values(run, batch_size=8)
    assert not marker.exists()
