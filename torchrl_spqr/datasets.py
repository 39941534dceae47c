"""Offline RL data: load D4RL / Minari datasets through TorchRL, or build D4RL-style ones locally.

Loading goes through TorchRL's own dataset classes:

- ``source="minari"``: :class:`torchrl.data.datasets.MinariExperienceReplay` on a Minari id
  (``mujoco/hopper/medium-v0``, ``D4RL/kitchen/mixed-v2``, ``local/hopper/random-v0``...).
  A dataset present in the local Minari store (``$MINARI_DATASETS_PATH``, else
  ``~/.minari/datasets``) is read from there with no network; otherwise it is
  downloaded into that store with ``minari.download_dataset`` (the call TorchRL
  makes itself; needs ``pip install "minari[hf]"`` and network access).
- ``source="d4rl"``: :class:`torchrl.data.datasets.D4RLExperienceReplay` with
  ``direct_download=True`` on a D4RL id (``hopper-medium-replay-v2``); no ``d4rl``
  package needed, the HDF5 file comes from the D4RL hosts.

Either way :func:`load_offline_dataset` returns an :class:`OfflineData`: a replay
buffer whose samples hold float32 ``observation``, ``action`` and ``("next",
observation / reward / done / terminated / truncated)`` with terminations and
time-limit truncations kept apart, the Gymnasium id to evaluate in, and the
reference min / max returns for D4RL-normalised scores (:func:`normalized_score`).
When the data is neither local nor downloadable, :class:`DatasetUnavailableError`
says what was tried and how to provide it.

Building datasets locally (D4RL recipe on Gymnasium MuJoCo v5 envs, written as
Minari datasets with ``minari.create_dataset_from_buffers``; h5py is enough)::

    # uniform random actions
    python -m torchrl_spqr.datasets build --env Hopper-v5 --kind random --steps 5000 \\
        --id local/hopper/random-v0
    # roll out the deterministic actor of an online run (sota_scripts/sac_ens_spqr output)
    python -m torchrl_spqr.datasets build --env Hopper-v5 --kind medium --steps 1000000 \\
        --policy-run RUN_DIR --id local/hopper/medium-v0 --ref-max-score 3234.3
    python -m torchrl_spqr.datasets build --env Hopper-v5 --kind expert --steps 1000000 \\
        --policy-run EXPERT_RUN_DIR --id local/hopper/expert-v0
    # the replay buffer of the medium run / of the expert run (checkpoint/buffer)
    python -m torchrl_spqr.datasets build --kind medium-replay --source-run RUN_DIR \\
        --id local/hopper/medium-replay-v0 --ref-max-score 3234.3
    python -m torchrl_spqr.datasets build --kind full-replay --source-run EXPERT_RUN_DIR \\
        --id local/hopper/full-replay-v0
    # concatenation of two local datasets
    python -m torchrl_spqr.datasets build --kind medium-expert \\
        --parts local/hopper/medium-v0 local/hopper/expert-v0 --id local/hopper/medium-expert-v0

    python -m torchrl_spqr.datasets list          # local datasets, sizes, reference scores
    python -m torchrl_spqr.datasets info local/hopper/random-v0

Each built dataset records ``ref_min_score`` (mean return of a uniform random
policy over ``--ref-episodes`` episodes, unless given) and ``ref_max_score``
(given; else the mean return of the expert policy for ``expert`` / ``full-replay``
/ ``--expert-run``; else D4RL's published expert score for the env family) in
its Minari metadata, and its recipe in the description. Options: ``--seed``,
``--max-episode-steps``, ``--noise`` (Gaussian exploration noise for policy
rollouts), ``--expert-run`` (run whose actor sets ``ref_max_score``; the data source of
``full-replay``), ``--ref-episodes``, ``--ref-min-score``, ``--ref-max-score``,
``--overwrite``.

Every argument is checked before anything is built, and an error names the value and
what to pass instead. Ids have Minari's form ``namespace/name-vN`` (namespaces may nest;
letters, digits, ``_`` and ``-``): an id with no namespace or version, an absolute path,
``.`` / ``..`` / empty components, or one whose folder would resolve outside the Minari
store is refused. A dataset is written aside, in the store's hidden folder
``.torchrl_spqr_build/``, and moved to its id only once complete; ``--overwrite``
replaces exactly the one dataset named (a folder holding only ``data/``), by moving the
old one aside, the new one into place, and then deleting the old one. A build killed at
any instant leaves the id holding either its previous dataset or the complete new one:
the next build, load, ``list`` or ``info`` in that store finishes or undoes an
interrupted swap (with a warning) and removes the staging folder.

A local dataset whose HDF5 file or metadata cannot be read raises
:class:`DatasetCorruptedError` naming the file; recorded reference scores that are not
finite, or with ``ref_max_score <= ref_min_score``, raise a ``ValueError`` on load
rather than give NaN or inverted normalised scores.

Only safe loaders are used: ``torch.load(weights_only=True)``, tensordict
memmaps and HDF5.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    import minari
    import torchrl.data

__all__ = [
    "D4RL_ENV_IDS",
    "D4RL_REF_SCORES",
    "DatasetCorruptedError",
    "DatasetUnavailableError",
    "KINDS",
    "OfflineData",
    "build_dataset",
    "d4rl_env_id",
    "d4rl_env_kwargs",
    "d4rl_ref_scores",
    "load_offline_dataset",
    "load_policy_from_run",
    "main",
    "minari_datasets_path",
    "normalized_score",
    "parse_d4rl_id",
]

#: Dataset recipes understood by :func:`build_dataset` (D4RL's Gym-MuJoCo splits).
KINDS = ("random", "medium", "expert", "medium-replay", "full-replay", "medium-expert")

#: Reference returns for D4RL's normalised score, per environment family, identical for
#: every split and version (v0/v1/v2). Source: D4RL, ``d4rl/infos.py`` (REF_MIN_SCORE /
#: REF_MAX_SCORE) and ``d4rl/gym_mujoco/__init__.py`` (HOPPER_RANDOM_SCORE = -20.272305,
#: HOPPER_EXPERT_SCORE = 3234.3, ...), https://github.com/Farama-Foundation/D4RL.
D4RL_REF_SCORES: dict[str, tuple[float, float]] = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}

#: Gymnasium env to evaluate a D4RL Gym-MuJoCo dataset in, with its constructor kwargs.
#: D4RL's ``*-v2`` data was collected in gym's mujoco-py ``*-v3`` envs; Gymnasium's ``v4``
#: are those envs (same model files, same reward) on the ``mujoco`` bindings, so every
#: family maps to ``v4``: the data's own dynamics and reward. ``v5`` differs:
#: ``Walker2d-v5`` gives the right foot friction 1.9 (v2-v4: right 0.9, left 1.9), and
#: Hopper / Walker2d / Ant ``v5`` no longer pay ``healthy_reward`` on the step that
#: terminates an episode (D4RL's returns and reference scores include it). HalfCheetah
#: v4 and v5 are identical (v4 kept for uniformity). D4RL's ant data has 111 dims
#: (contact forces of all 14 bodies, world included): only ``Ant-v4`` with
#: ``use_contact_forces=True`` matches (``Ant-v5`` gives 105 dims).
#: Checked by ``tests/test_fidelity_envs_init.py`` (friction read from the simulator).
D4RL_ENV_IDS: dict[str, tuple[str, dict[str, Any]]] = {
    "halfcheetah": ("HalfCheetah-v4", {}),
    "hopper": ("Hopper-v4", {}),
    "walker2d": ("Walker2d-v4", {}),
    "ant": ("Ant-v4", {"use_contact_forces": True}),
}

_D4RL_ID = re.compile(
    r"^(?P<family>halfcheetah|hopper|walker2d|ant)-"
    r"(?P<kind>random|medium|expert|medium-replay|medium-expert|full-replay)-v(?P<version>\d+)$"
)

#: Seconds a remote download may block on one socket operation before failing.
DOWNLOAD_TIMEOUT_S = float(os.environ.get("TORCHRL_SPQR_DOWNLOAD_TIMEOUT", "30"))

_RANDOM_REF_SEED = 123_456  # fixed: every split of one env gets the same ref_min_score


class DatasetUnavailableError(RuntimeError):
    """The dataset is neither on this machine nor downloadable; the message says what to do."""


class DatasetCorruptedError(ValueError):
    """A local dataset's files cannot be read (truncated / garbage HDF5, broken metadata).

    The message names the file, the low-level error and how to replace the dataset.
    """


@dataclass
class OfflineData:
    """A loaded offline dataset and what is needed to evaluate on it."""

    buffer: torchrl.data.ReplayBuffer
    env_id: str
    ref_min_score: float | None
    ref_max_score: float | None
    num_transitions: int
    dataset_id: str
    #: extra ``gymnasium.make`` kwargs of the evaluation env (e.g. ``max_episode_steps``).
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = "minari"
    #: the reward transform applied once to the stored rewards: r' = reward_scale * r + reward_shift
    #: (training targets only; evaluation returns stay in the environment's own reward).
    reward_scale: float = 1.0
    reward_shift: float = 0.0

    def normalized_score(self, episode_return: float) -> float:
        if self.ref_min_score is None or self.ref_max_score is None:
            raise ValueError(f"Dataset {self.dataset_id!r} has no reference scores.")
        return normalized_score(episode_return, self.ref_min_score, self.ref_max_score)


def normalized_score(episode_return: float, ref_min_score: float, ref_max_score: float) -> float:
    """D4RL's normalised score: ``100 * (R - min) / (max - min)`` (0 random, 100 expert).

    The reference scores must be finite with ``max > min`` (else a ValueError names them:
    a zero-width range would divide by zero, an inverted one would rank returns backwards).
    A non-finite ``episode_return`` (an evaluation that diverged) gives a non-finite score.
    """
    if ref_min_score is None or ref_max_score is None:
        raise ValueError("normalized_score needs both reference scores.")
    span = float(ref_max_score) - float(ref_min_score)
    if not math.isfinite(span) or span <= 0:
        raise ValueError(
            f"Degenerate reference scores: min={ref_min_score}, max={ref_max_score} "
            "(normalised scores need finite values with max > min)."
        )
    return 100.0 * (float(episode_return) - float(ref_min_score)) / span


# --------------------------------------------------------------------------- D4RL ids
def parse_d4rl_id(dataset_id: str) -> tuple[str, str, int]:
    """``"hopper-medium-replay-v2"`` -> ``("hopper", "medium-replay", 2)``."""
    m = _D4RL_ID.match(dataset_id)
    if m is None:
        raise ValueError(
            f"{dataset_id!r} is not a D4RL Gym-MuJoCo id (<{'|'.join(D4RL_ENV_IDS)}>-"
            f"<{'|'.join(KINDS)}>-v<N>). For Kitchen / AntMaze use the Minari ids "
            "(D4RL/kitchen/mixed-v2, D4RL/antmaze/umaze-v1) with source='minari'."
        )
    return m["family"], m["kind"], int(m["version"])


def d4rl_env_id(dataset_id: str) -> str:
    """Gymnasium id to evaluate a D4RL dataset in (``hopper-medium-v2`` -> ``Hopper-v4``)."""
    return D4RL_ENV_IDS[parse_d4rl_id(dataset_id)[0]][0]


def d4rl_env_kwargs(dataset_id: str) -> dict[str, Any]:
    return dict(D4RL_ENV_IDS[parse_d4rl_id(dataset_id)[0]][1])


def d4rl_ref_scores(dataset_id: str) -> tuple[float, float]:
    """D4RL's published ``(REF_MIN_SCORE, REF_MAX_SCORE)`` for a D4RL id."""
    return D4RL_REF_SCORES[parse_d4rl_id(dataset_id)[0]]


def _family_of_env(env_id: str) -> str | None:
    name = env_id.split("-")[0].lower()
    return name if name in D4RL_REF_SCORES else None


# --------------------------------------------------------------------------- Minari paths
def minari_datasets_path() -> Path:
    """The local Minari store: ``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets``."""
    p = os.environ.get("MINARI_DATASETS_PATH")
    return Path(p) if p else Path.home() / ".minari" / "datasets"


def _local_h5(dataset_id: str) -> Path:
    return minari_datasets_path() / dataset_id / "data" / "main_data.hdf5"


def _exists_locally(dataset_id: str) -> bool:
    return _local_h5(dataset_id).exists()


# --------------------------------------------------------------------------- ids and the store
#: Minari's id form, with the namespace and the version required (namespaces nest):
#: ``local/hopper/random-v0``; each component is letters, digits, ``_`` or ``-``.
_MINARI_ID = re.compile(r"^(?P<namespace>[-\w]+(?:/[-\w]+)*)/(?P<name>[-\w]+?)-v(?P<version>\d+)$")
_MINARI_ID_FORM = "namespace/name-vN (e.g. local/hopper/random-v0)"

#: Hidden folder of the Minari store where :func:`build_dataset` writes a dataset before
#: swapping it in (Minari's listings skip hidden folders). A build killed midway leaves a
#: folder here; the next build or load in this store settles it (see
#: :func:`_recover_interrupted_builds`).
_STAGING_DIR = ".torchrl_spqr_build"


def _check_dataset_id(dataset_id: Any) -> Path:
    """The folder of ``dataset_id`` in the local Minari store, once the id is known to be safe.

    Refused with a ``ValueError`` naming the expected form ``namespace/name-vN``: ids with
    no namespace or no version, absolute paths, ``.`` / ``..`` / empty components, other
    characters; then ids whose folder resolves outside the store (a symbolic link) or
    inside another dataset's folder. Nothing is read or written but ``stat`` calls.
    """
    if not isinstance(dataset_id, str) or not _MINARI_ID.match(dataset_id):
        text = dataset_id if isinstance(dataset_id, str) else ""
        parts = text.split("/")
        if not isinstance(dataset_id, str):
            why = f"it is a {type(dataset_id).__name__}, not a string"
        elif not text.strip():
            why = "it is empty"
        elif text.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", text):
            why = "it is an absolute path"
        elif "\\" in text:
            why = "it contains a backslash"
        elif any(p in (".", "..") for p in parts):
            why = "it has a '.' or '..' component"
        elif "" in parts:
            why = "it has an empty component ('//', or a leading or trailing '/')"
        elif len(parts) == 1:
            why = "it has no namespace"
        elif not re.search(r"-v\d+$", text):
            why = "it has no version suffix -vN"
        else:
            why = "a component holds a character other than letters, digits, '_' and '-'"
        hint = ""
        if _D4RL_ID.match(text):
            fam, kind, _ = parse_d4rl_id(text)
            hint = (
                f" It looks like a D4RL id: load it with source='d4rl', or use the Minari id of "
                f"a local stand-in such as local/{fam}/{kind}-v0."
            )
        raise ValueError(
            f"Dataset id {dataset_id!r} is not a Minari id: {why}. Expected the form "
            f"{_MINARI_ID_FORM}.{hint}"
        )
    store = minari_datasets_path().expanduser().resolve()
    folder = (store / dataset_id).resolve()
    if folder == store or not folder.is_relative_to(store):
        raise ValueError(
            f"Dataset id {dataset_id!r} resolves to {folder}, outside the Minari store {store} "
            "(through a symbolic link); refusing to use it. Use an id whose folder is inside "
            "the store, or point MINARI_DATASETS_PATH at the store that holds it."
        )
    parent = folder.parent
    while parent != store:
        if parent.exists() and not parent.is_dir():
            raise ValueError(
                f"Dataset id {dataset_id!r}: {parent} is a file, not a namespace folder. "
                "Choose another namespace."
            )
        if (parent / "data").is_dir():
            raise ValueError(
                f"Dataset id {dataset_id!r} lies inside the folder of the dataset "
                f"{parent.relative_to(store).as_posix()!r} ({parent}); Minari cannot list a "
                "dataset nested in another. Choose another namespace."
            )
        parent = parent.parent
    return folder


def _staging_root() -> Path:
    return minari_datasets_path().expanduser().resolve() / _STAGING_DIR


def _id_lock(dataset_id: str) -> Path:
    root = _staging_root()
    root.mkdir(parents=True, exist_ok=True)
    return root / (dataset_id.replace("/", "+") + ".lock")


@contextlib.contextmanager
def _minari_store(path: Path) -> Iterator[None]:
    """Point Minari (``MINARI_DATASETS_PATH``) at ``path`` for the duration."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _try_lock(path: Path):
    """An open file holding an exclusive ``flock`` on ``path``, or None if another holds it.

    None as well where ``fcntl`` is unavailable: then nothing is taken for abandoned.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    fh = open(path, "a+")  # noqa: SIM115 - returned to the caller
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh


def _new_stage(dataset_id: str):
    """A fresh staging folder for a build of ``dataset_id``, locked while this process lives.

    Layout: ``.lock`` (``flock``-ed by the builder), ``journal.json`` (the id), ``new/``
    (a private Minari store the dataset is written into), ``complete`` (written once the
    new dataset is whole) and, during a swap, ``old/`` (the replaced dataset).
    """
    root = _staging_root()
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
    lock = open(stage / ".lock", "a+")  # noqa: SIM115 - closed by the caller
    with contextlib.suppress(ImportError):
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
    journal = {"dataset_id": dataset_id, "pid": os.getpid(), "host": socket.gethostname()}
    (stage / "journal.json").write_text(json.dumps(journal))
    return stage, lock


def _settle_stage(stage: Path, dataset_id: str, target: Path, roll_forward: bool) -> str | None:
    """Leave a complete dataset at ``target`` if ``stage`` holds one, then delete ``stage``.

    With the dataset's folder missing (a build stopped between the two renames of its
    swap, or after completing a first build): the completed new build is moved into place
    (``roll_forward``; a build that died) or else the old dataset is moved back. Only
    ``stage`` (inside the store's staging folder) is ever deleted. Call with the id's lock.
    """
    note = None
    new, old = stage / "new" / dataset_id, stage / "old"
    if not target.exists() and not target.is_symlink():
        if roll_forward and (stage / "complete").exists() and (new / "data").is_dir():
            _ensure_namespaces(dataset_id)
            os.rename(new, target)
            note = f"installed the completed build of {dataset_id!r} of an interrupted build"
        elif (old / "data").is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(old, target)
            note = f"restored the previous {dataset_id!r}, set aside by an interrupted build"
    if (old / "data").is_dir() and not target.exists():  # pragma: no cover - defensive
        return note  # keep the only copy
    shutil.rmtree(stage, ignore_errors=True)
    return note


def _recover_interrupted_builds() -> list[str]:
    """Settle the staging folders of builds that died (their lock is free); returns notes.

    After this, every dataset whose build was killed is at its id: the previous version,
    or the new one if it was complete and the previous one had already been moved aside.
    """
    root = _staging_root()
    if not root.is_dir():
        return []
    notes: list[str] = []
    for stage in sorted(root.iterdir()):
        if not stage.is_dir():
            continue
        try:
            lock = _try_lock(stage / ".lock")
        except OSError:  # vanished meanwhile (its build finished)
            continue
        if lock is None:  # a live build
            continue
        with lock:
            try:
                dataset_id = json.loads((stage / "journal.json").read_text())["dataset_id"]
                target = _check_dataset_id(dataset_id)
            except (OSError, ValueError, KeyError, TypeError):
                # no readable journal: a build that died while starting (nothing built yet)
                young = time.time() - stage.stat().st_mtime < 3600
                if not young and not (stage / "old").exists():
                    shutil.rmtree(stage, ignore_errors=True)
                continue
            with _file_lock(_id_lock(dataset_id)):
                note = _settle_stage(stage, dataset_id, target, roll_forward=True)
        if note:
            notes.append(note)
    for note in notes:
        warnings.warn(f"Minari store {minari_datasets_path()}: {note}.", stacklevel=3)
    return notes


def _ensure_namespaces(dataset_id: str) -> None:
    """Minari's namespace metadata files for the id's namespace and its parents (if missing)."""
    store = minari_datasets_path().expanduser().resolve()
    parts = dataset_id.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        folder = store.joinpath(*parts[:i])
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "namespace_metadata.json"
        if not meta.exists():
            meta.write_text("{}")


def _check_replaceable(dataset_id: str, target: Path) -> None:
    """``target`` is one Minari dataset's folder (``data/`` and no other folder), or raise."""
    sub = sorted(p.name for p in target.iterdir() if p.is_dir()) if target.is_dir() else None
    if sub != ["data"] or target.is_symlink():
        raise ValueError(
            f"{target} (the folder of {dataset_id!r}) is not a single Minari dataset folder "
            f"(expected only a data/ subfolder, found {sub if sub is not None else 'a file'}): "
            "refusing to replace it. Move or delete it by hand, or choose another id."
        )


def _corrupted(dataset_id: str, path: Path, err: BaseException) -> DatasetCorruptedError:
    return DatasetCorruptedError(
        f"Local Minari dataset {dataset_id!r} cannot be read: {path}: {type(err).__name__}: "
        f"{str(err).rstrip('. ')}. The file is truncated or corrupted (an interrupted build, copy or download?). "
        f"Rebuild it (python -m torchrl_spqr.datasets build ... --id {dataset_id} --overwrite), "
        f"or delete {minari_datasets_path() / dataset_id} and download or copy it again."
    )


def _check_hdf5(dataset_id: str, full: bool = False) -> None:
    """Open the dataset's HDF5 file and its episode groups; DatasetCorruptedError if unreadable.

    ``full``: read every array too (a file damaged past its index).
    """
    import h5py

    h5 = _local_h5(dataset_id)
    try:
        with h5py.File(h5, "r") as f:
            names = list(f.keys())
            if not names:
                raise ValueError("the file holds no episodes")
            for name in names:
                ep = f[name]
                missing = [k for k in ("actions", "rewards", "terminations") if k not in ep]
                if missing:
                    raise KeyError(f"episode {name!r} lacks {missing}")
                if full:
                    for _ in _h5_leaves(ep):
                        pass
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise _corrupted(dataset_id, h5, err) from err


def _ref_scores(meta: dict[str, Any], dataset_id: str) -> tuple[float | None, float | None]:
    """The dataset's ``(ref_min_score, ref_max_score)``; None where not recorded.

    A recorded value that is not a finite number, or a range with ``max <= min``, would
    give NaN / infinite / inverted normalised scores: refused with a ValueError.
    """
    out: list[float | None] = []
    for key in ("ref_min_score", "ref_max_score"):
        raw = meta.get(key)
        if raw is None:
            out.append(None)
            continue
        v = _opt_float(raw)
        if v is None:
            raise ValueError(
                f"Dataset {dataset_id!r} records {key}={raw!r}, not a finite number, so its "
                "normalised scores would be NaN. Rebuild it with --ref-episodes >= 1, or "
                "give --ref-min-score / --ref-max-score (python -m torchrl_spqr.datasets "
                "build ... --overwrite)."
            )
        out.append(v)
    lo, hi = out
    if lo is not None and hi is not None and not hi > lo:
        raise ValueError(
            f"Dataset {dataset_id!r} records ref_min_score={lo} and ref_max_score={hi}: "
            "normalised scores need ref_max_score > ref_min_score. Rebuild it with "
            "--ref-min-score / --ref-max-score (python -m torchrl_spqr.datasets build ... "
            "--overwrite)."
        )
    return lo, hi


@contextlib.contextmanager
def _network_timeout(seconds: float = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    """Bound every blocking socket operation of a download (no long hang without network)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _guess_build_command(dataset_id: str) -> str:
    """A ``build`` command that makes a local stand-in for ``dataset_id`` (same id)."""
    low = dataset_id.lower()
    env = next(
        (
            gym_id.replace("-v4", "-v5")
            for fam, (gym_id, _) in D4RL_ENV_IDS.items()
            if re.search(rf"(^|[/_-]){fam}([/_-]|$)", low)
        ),
        "ENV_ID",
    )
    kind = next((k for k in sorted(KINDS, key=len, reverse=True) if k in low), "KIND")
    extra = {
        "random": " --steps 1000000",
        "medium": " --steps 1000000 --policy-run RUN_DIR",
        "expert": " --steps 1000000 --policy-run EXPERT_RUN_DIR",
        "medium-replay": " --source-run RUN_DIR",
        "full-replay": " --source-run EXPERT_RUN_DIR",
        "medium-expert": " --parts MEDIUM_ID EXPERT_ID",
    }.get(kind, "")
    if "/" in dataset_id:
        local_id = dataset_id
    else:
        fam = low.split("-")[0]
        local_id = f"local/{fam}/{kind if kind != 'KIND' else 'data'}-v0"
    return f"python -m torchrl_spqr.datasets build --env {env} --kind {kind}{extra} --id {local_id}"


def _unavailable(dataset_id: str, tried: list[str], how: list[str]) -> DatasetUnavailableError:
    lines = [f"Offline dataset {dataset_id!r} is not available on this machine.", "Tried:"]
    lines += [f"  {i + 1}. {t}" for i, t in enumerate(tried)]
    lines.append("To provide the data locally:")
    lines += [f"  - {h}" for h in how]
    return DatasetUnavailableError("\n".join(lines))


# --------------------------------------------------------------------------- loading
def load_offline_dataset(
    dataset_id: str,
    *,
    batch_size: int,
    source: str = "minari",
    root: str | None = None,
    download: bool = True,
    reward_scale: float = 1.0,
    reward_shift: float = 0.0,
) -> OfflineData:
    """Load ``dataset_id`` through TorchRL's dataset class for ``source``.

    Args:
        dataset_id: a Minari id (``source="minari"``) or a D4RL id (``source="d4rl"``).
        batch_size: the buffer's ``sample()`` size.
        source: ``"minari"`` or ``"d4rl"``.
        root: TorchRL's cache folder for the converted memmap (the ``root`` argument of
            ``MinariExperienceReplay`` / ``D4RLExperienceReplay``; default
            ``~/.cache/torchrl/{minari,d4rl}``). The raw Minari data lives in the Minari
            store (``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``).
        download: try the remote hub when the data is not on this machine.
        reward_scale, reward_shift: ``r' = reward_scale * r + reward_shift``, applied once, here,
            to the buffer's stored ``("next", "reward")`` (an in-memory copy: the dataset and
            TorchRL's converted cache on disk are never modified). Scale first, then shift, as
            CORL's ``modify_reward`` (``rewards * reward_scale + reward_bias``); the SPQR
            authors' ``(r - 0.5) * 1.0`` is scale 1, shift -0.5. Defaults: unchanged rewards.

    Raises:
        DatasetUnavailableError: not local and not downloadable (message names what was
            tried and how to provide the data).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected an integer >= 1.")
    scale = _reward_arg("reward_scale", reward_scale, nonzero=True)
    shift = _reward_arg("reward_shift", reward_shift)
    if source == "minari":
        data = _load_minari(dataset_id, batch_size, root, download)
    elif source == "d4rl":
        data = _load_d4rl(dataset_id, batch_size, root, download)
    else:
        raise ValueError(f"source={source!r}: expected 'minari' or 'd4rl'.")
    if scale != 1.0 or shift != 0.0:
        _transform_rewards(data.buffer, scale, shift)
    data.reward_scale, data.reward_shift = scale, shift
    return data


def _reward_arg(name: str, value: Any, nonzero: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or (nonzero and float(value) == 0.0):
        need = "a finite, non-zero number" if nonzero else "a finite number"
        raise ValueError(f"{name}={value!r}: expected {need}.")
    return float(value)


def _transform_rewards(rb, scale: float, shift: float) -> None:
    """``r' = scale * r + shift`` on the stored rewards, once, without touching the files.

    The storage's tensordict is TorchRL's memory-mapped (and locked) cache, shared with
    other runs: swap in a shallow copy whose ``("next", "reward")`` is a transformed
    in-memory tensor; every other entry stays the same memory-mapped tensor.
    """
    storage = rb.storage
    td = storage._storage  # noqa: SLF001 - TensorStorage's tensordict (memmap)
    r = td["next", "reward"]
    plain = r.as_subclass(torch.Tensor).to(torch.float64, copy=True)
    new = plain.mul_(scale).add_(shift).to(r.dtype)
    shallow = td.clone(recurse=False)
    shallow.unlock_()
    shallow.set(("next", "reward"), new)
    storage._storage = shallow  # noqa: SLF001


def _load_minari(dataset_id: str, batch_size: int, root, download: bool) -> OfflineData:
    _check_dataset_id(dataset_id)  # ValueError on a malformed id, before any file access
    _recover_interrupted_builds()
    local = minari_datasets_path() / dataset_id
    if not _exists_locally(dataset_id):
        tried = [
            f"local Minari dataset {local} (MINARI_DATASETS_PATH="
            f"{os.environ.get('MINARI_DATASETS_PATH', '<unset>; default ~/.minari/datasets>')}): "
            "not found"
        ]
        how = [
            "build a D4RL-style stand-in under the same id on this machine: "
            + _guess_build_command(dataset_id),
            f'or, on a machine with network: `pip install "minari[hf]"; minari download '
            f"{dataset_id}`, then copy its folder ~/.minari/datasets/{dataset_id} to {local} "
            "(or point MINARI_DATASETS_PATH at the folder that holds it)",
        ]
        if not download:
            tried.append("remote download: skipped (download=False)")
            raise _unavailable(dataset_id, tried, how)
        import minari

        t0 = time.perf_counter()
        try:
            with _network_timeout(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                minari.download_dataset(dataset_id)
        except Exception as err:  # hub unreachable, unknown id, missing minari[hf] extra...
            tried.append(
                f"remote download minari.download_dataset({dataset_id!r}) from the Farama "
                f"Minari hub: failed after {time.perf_counter() - t0:.1f}s with "
                f"{type(err).__name__}: {err}"
            )
            raise _unavailable(dataset_id, tried, how) from err
        if not _exists_locally(dataset_id):  # pragma: no cover - defensive
            tried.append("remote download returned but wrote no data")
            raise _unavailable(dataset_id, tried, how)

    _check_hdf5(dataset_id)
    meta = _minari_metadata(dataset_id)
    ref_min, ref_max = _ref_scores(meta, dataset_id)
    env_id, env_kwargs = _minari_eval_env(meta)
    try:
        rb = _minari_replay_buffer(dataset_id, batch_size, root)
    except (OSError, KeyError, ValueError, RuntimeError):
        _check_hdf5(dataset_id, full=True)  # a damaged file is named as such
        raise
    _cast_float64_on_sample(rb)
    return OfflineData(
        buffer=rb,
        env_id=env_id,
        ref_min_score=ref_min,
        ref_max_score=ref_max,
        num_transitions=len(rb),
        dataset_id=dataset_id,
        env_kwargs=env_kwargs,
        source="minari",
    )


def _load_d4rl(dataset_id: str, batch_size: int, root, download: bool) -> OfflineData:
    parse_d4rl_id(dataset_id)  # ValueError on an unknown id, before any download
    from torchrl.data.datasets import D4RLExperienceReplay
    from torchrl.data.datasets.d4rl_infos import D4RL_DATASETS
    from torchrl.data.datasets.utils import _get_root_dir

    url = D4RL_DATASETS.get(dataset_id)
    if url is None:
        raise ValueError(f"{dataset_id!r} is not in TorchRL's D4RL table (D4RL_DATASETS).")
    cache = Path(root) if root is not None else Path(_get_root_dir("d4rl"))
    t0 = time.perf_counter()
    try:
        with _network_timeout(), _quiet_torchrl():
            rb = D4RLExperienceReplay(
                dataset_id,
                batch_size,
                direct_download=True,
                # done = terminated only: TorchRL zeroes ("next", "observation") where done,
                # which must not hit time-limit truncations (they are bootstrapped from).
                use_truncated_as_done=False,
                download=download,
                root=root,
            )
    except Exception as err:
        if (cache / dataset_id).exists():  # the data is here: a real error, not a missing file
            raise
        family = parse_d4rl_id(dataset_id)[0]
        tried = [f"TorchRL cache {cache / dataset_id}: not found"]
        tried.append(
            f"direct download of {url} (D4RLExperienceReplay(direct_download=True)): "
            + (
                "skipped (download=False)"
                if not download
                else f"failed after {time.perf_counter() - t0:.1f}s with "
                f"{type(err).__name__}: {err}"
            )
        )
        how = [
            f"on a machine with network, run load_offline_dataset({dataset_id!r}, "
            f"source='d4rl', ...) once and copy {cache / dataset_id} here (same path, or pass "
            "root=)",
            f"or use Minari's re-collected MuJoCo v5 datasets instead (e.g. "
            f"mujoco/{family}/medium-v0, mujoco/{family}/expert-v0 with source='minari'; not "
            "the D4RL data), downloaded elsewhere with `minari download` and copied to "
            f"{minari_datasets_path()}",
            "or build a D4RL-style stand-in on this machine: " + _guess_build_command(dataset_id),
        ]
        raise _unavailable(dataset_id, tried, how) from err
    _cast_float64_on_sample(rb)
    lo, hi = d4rl_ref_scores(dataset_id)
    return OfflineData(
        buffer=rb,
        env_id=d4rl_env_id(dataset_id),
        ref_min_score=lo,
        ref_max_score=hi,
        num_transitions=len(rb),
        dataset_id=dataset_id,
        env_kwargs=d4rl_env_kwargs(dataset_id),
        source="d4rl",
    )


def _minari_replay_buffer(dataset_id: str, batch_size: int, root):
    """``MinariExperienceReplay`` on a local Minari dataset, converted once per version.

    TorchRL re-converts a local dataset into ``root/<id>`` on every
    ``load_from_local_minari=True`` construction, truncating files that another process
    (a parallel seed) may have mapped. So: convert (and repair, see
    :func:`_fill_minari_storage`) under a file lock, stamp the cache with the HDF5 file's
    size and mtime, and later open the stamped cache read-only through TorchRL's own
    ``download=False`` path; a rebuilt dataset gets a new stamp and is re-converted.
    """
    from torchrl.data.datasets import MinariExperienceReplay
    from torchrl.data.datasets.utils import _get_root_dir

    h5 = _local_h5(dataset_id)
    cache_root = Path(root) if root is not None else Path(_get_root_dir("minari"))
    cache = cache_root / dataset_id
    stamp_path = cache / "torchrl_spqr_source.json"
    st = h5.stat()
    stamp = {"hdf5": str(h5.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache.parent / f".{cache.name}.lock"), _quiet_torchrl():
        fresh = False
        with contextlib.suppress(OSError, ValueError):
            fresh = (cache / "env_metadata.json").exists() and json.loads(
                stamp_path.read_text()
            ) == stamp
        if fresh:
            return MinariExperienceReplay(
                dataset_id, batch_size, root=str(cache_root), download=False
            )
        stamp_path.unlink(missing_ok=True)
        rb = MinariExperienceReplay(
            dataset_id,
            batch_size,
            root=str(cache_root),
            download=False,
            load_from_local_minari=True,
        )
        _fill_minari_storage(_storage_td(rb), h5)
        stamp_path.write_text(json.dumps(stamp))
    return rb


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``; no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_torchrl() -> Iterator[None]:
    """Silence TorchRL's INFO dump of the tensordict structure and its progress bar."""
    import logging

    from torchrl._utils import logger as trl_logger

    level = trl_logger.level
    trl_logger.setLevel(max(level, logging.WARNING))
    try:
        # TorchRL's per-episode tqdm bar writes to sys.stderr (TQDM_DISABLE is read only
        # when tqdm is imported); errors still propagate as exceptions.
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        trl_logger.setLevel(level)


def _storage_td(rb):
    storage = rb.storage
    return storage._storage  # noqa: SLF001 - TensorStorage's tensordict (memmap)


def _fill_minari_storage(td, h5_path: Path) -> None:
    """Write the episodes of ``h5_path`` into TorchRL's converted memmap ``td``.

    TorchRL 0.14.1's ``MinariExperienceReplay`` fills an in-memory tensordict and then
    calls ``memmap_like`` on it, which allocates a *contentless* memmap: every value of
    the converted dataset reads back as zero (verified on this machine). This repeats
    TorchRL's own conversion (same layout: episodes in id order, ``obs[:-1]`` /
    ``obs[1:]``, rewards and flags under ``"next"``) into that memmap, one write per
    entry; it is a same-value rewrite where TorchRL already filled it.
    """
    import h5py

    parts: dict[tuple[str, ...], list[np.ndarray]] = {}

    def add(key, arr):
        parts.setdefault(key, []).append(arr)

    with h5py.File(h5_path, "r") as f:
        names = sorted(f.keys(), key=lambda k: int(k.split("_")[-1]))
        for name in names:
            ep = f[name]
            actions = list(_h5_leaves(ep["actions"]))
            steps = int(actions[0][1].shape[0])
            for path, arr in actions:
                add(("action", *path), arr)
            for h5_key, key in (
                ("observations", "observation"),
                ("state", "state"),
                ("infos", "info"),
            ):
                if h5_key not in ep:
                    continue
                for path, arr in _h5_leaves(ep[h5_key]):
                    if arr.shape[:1] == (steps + 1,):  # per-step entries only, as TorchRL
                        add((key, *path), arr[:-1])
                        add(("next", key, *path), arr[1:])
            flags = {}
            for h5_key, key in (
                ("rewards", "reward"),
                ("terminations", "terminated"),
                ("truncations", "truncated"),
            ):
                flags[key] = np.asarray(ep[h5_key][()])
                add(("next", key), flags[key])
            add(
                ("next", "done"), flags["terminated"].astype(bool) | flags["truncated"].astype(bool)
            )
            add(("episode",), np.full(steps, int(name.split("_")[-1]), dtype=np.int64))
    leaves = {
        (k,) if isinstance(k, str) else tuple(k)
        for k in td.keys(include_nested=True, leaves_only=True)
    }
    for key, chunks in parts.items():
        if key not in leaves:
            continue
        arr = np.concatenate(chunks)
        dst = td.get(key)
        if arr.size != dst.numel():
            raise RuntimeError(
                f"{h5_path}: {key} holds {arr.shape} values but TorchRL's converted buffer "
                f"has {tuple(dst.shape)}."
            )
        dst.copy_(torch.from_numpy(arr).reshape(dst.shape).to(dst.dtype))


def _h5_leaves(obj, prefix: tuple[str, ...] = ()):
    """``(path, array)`` for the numeric datasets under an HDF5 dataset or group."""
    import h5py

    if isinstance(obj, h5py.Dataset):
        if obj.dtype.kind in "biuf":
            yield prefix, np.asarray(obj[()])
        return
    for k in obj:
        yield from _h5_leaves(obj[k], (*prefix, k))


def _cast_float64_on_sample(rb) -> None:
    """Append ``DoubleToFloat`` for every float64 entry, so samples are float32."""
    from torchrl.envs import DoubleToFloat

    td = _storage_td(rb)
    keys = [
        k for k, v in td.items(include_nested=True, leaves_only=True) if v.dtype == torch.float64
    ]
    if keys:
        rb.append_transform(DoubleToFloat(in_keys=keys, out_keys=keys))


def _opt_float(x) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _minari_metadata(dataset_id: str) -> dict[str, Any]:
    """The Minari metadata of a local dataset (``storage.metadata``: ref scores, env spec...)."""
    import minari

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = minari.load_dataset(dataset_id)
        return dict(ds.storage.metadata)
    except (OSError, KeyError, ValueError, TypeError) as err:
        if isinstance(err, FileNotFoundError) and not _exists_locally(dataset_id):
            raise
        raise _corrupted(dataset_id, minari_datasets_path() / dataset_id / "data", err) from err


def _minari_eval_env(meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Eval env id and ``gymnasium.make`` kwargs from the metadata's (eval_)env_spec."""
    import gymnasium as gym
    from gymnasium.envs.registration import EnvSpec

    raw = meta.get("eval_env_spec") or meta.get("env_spec")
    if raw is None:
        raise ValueError(f"Dataset {meta.get('dataset_id')!r} records no environment spec.")
    spec = (
        raw
        if isinstance(raw, EnvSpec)
        else EnvSpec.from_json(
            raw.replace('"order_enforce": true,', "")  # gymnasium >= 1.0 compatibility (as Minari)
        )
    )
    kwargs = dict(spec.kwargs or {})
    try:
        registered = gym.spec(spec.id)
        default_steps = registered.max_episode_steps
        kwargs = {k: v for k, v in kwargs.items() if registered.kwargs.get(k, object()) != v}
    except Exception:  # not registered here (e.g. gymnasium-robotics not installed)
        default_steps = None
    if spec.max_episode_steps is not None and spec.max_episode_steps != default_steps:
        kwargs["max_episode_steps"] = int(spec.max_episode_steps)
    return spec.id, kwargs


# --------------------------------------------------------------------------- policies
def load_policy_from_run(run_dir: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """The deterministic actor (tanh of the Gaussian mean) of an online run, as ``obs -> action``.

    Rebuilds env, actor, critics and loss from the config saved in
    ``run_dir/checkpoint/state.pt`` with ``torchrl_spqr.training.builders`` and loads the
    loss state dict (``torch.load(weights_only=True)``). Accepts one observation
    ``[obs_dim]`` or a batch ``[..., obs_dim]``; returns float32 actions.
    """
    from tensordict import TensorDict
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    from torchrl_spqr.training import builders as B
    from torchrl_spqr.training.checkpoint import load_checkpoint

    state = load_checkpoint(Path(run_dir))
    cfg = state.get("config")
    if not cfg:
        raise ValueError(
            f"{run_dir}/checkpoint/state.pt has no 'config': cannot rebuild the actor."
        )
    env = B.make_environment(cfg, seed=0)
    try:
        actor = B.make_actor(cfg, env)
        critics = B.make_critics(cfg, env)
        loss, base = B.make_loss_module(cfg, actor, critics, env.action_spec)
        loss.load_state_dict(state["loss"])
        low = env.action_spec.space.low.cpu().numpy()
        high = env.action_spec.space.high.cpu().numpy()
        obs_dim = int(env.observation_spec["observation"].shape[-1])
    finally:
        env.close()
    net = base.actor_network  # a private copy: it may keep the loaded weights for good
    base.actor_network_params.detach().to_module(net)
    net.eval()

    def full(x: torch.Tensor) -> torch.Tensor:
        td = TensorDict({"observation": x}, batch_size=x.shape[:-1])
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            return net(td)["action"]

    # The TanhNormal actor's deterministic action is low + (high - low) * (tanh(loc) + 1) / 2
    # (its transforms applied to the Gaussian mean). Calling the MLP directly is ~10x faster
    # per observation than the ProbabilisticActor; it is used only if it matches exactly.
    forward = full
    with contextlib.suppress(Exception), torch.no_grad():
        mlp = net.module[0].module
        lo_t, hi_t = torch.as_tensor(low), torch.as_tensor(high)

        def fast(x: torch.Tensor) -> torch.Tensor:
            loc = mlp(x)[0]
            return (hi_t + lo_t) / 2 + (hi_t - lo_t) / 2 * torch.tanh(loc)

        probe = 3 * torch.randn(16, obs_dim)
        if torch.allclose(fast(probe), full(probe), rtol=1e-5, atol=1e-6):
            forward = fast

    def policy(obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
        with torch.no_grad():
            action = forward(x)
        return np.clip(action.numpy().astype(np.float32), low, high)

    policy.run_dir = str(run_dir)  # type: ignore[attr-defined]
    policy.env_id = str(B._get(cfg, "env.name"))  # noqa: SLF001  # type: ignore[attr-defined]
    return policy


class _UniformPolicy:
    def __init__(self, space, seed: int) -> None:
        self.space = space
        self.space.seed(seed)

    def __call__(self, obs):
        return self.space.sample()


# --------------------------------------------------------------------------- building
@dataclass
class _Episode:
    observations: np.ndarray  # [T + 1, obs_dim] float32
    actions: np.ndarray  # [T, act_dim] float32
    rewards: np.ndarray  # [T] float32
    terminations: np.ndarray  # [T] bool
    truncations: np.ndarray  # [T] bool
    seed: int | None = None

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


def _make_env(env_id: str, max_episode_steps: int | None, env_kwargs: dict | None = None):
    import gymnasium as gym

    kwargs = dict(env_kwargs or {})
    if max_episode_steps:
        kwargs["max_episode_steps"] = int(max_episode_steps)
    return gym.make(env_id, **kwargs)


def _rollout_steps(
    env,
    policy: Callable,
    steps: int,
    seed: int,
    noise: float = 0.0,
) -> list[_Episode]:
    """Exactly ``steps`` transitions; the trailing incomplete episode is marked truncated."""
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    episodes: list[_Episode] = []
    total, first = 0, True
    while total < steps:
        ep_seed = seed if first else None
        obs, _ = env.reset(seed=ep_seed)
        first = False
        Ob, A, R, Te, Tr = [obs], [], [], [], []
        while True:
            a = np.asarray(policy(obs), dtype=np.float32)
            if noise > 0:
                a = np.clip(a + noise * rng.standard_normal(a.shape), low, high).astype(np.float32)
            obs, r, term, trunc, _ = env.step(a)
            Ob.append(obs)
            A.append(a)
            R.append(r)
            Te.append(bool(term))
            Tr.append(bool(trunc) and not term)
            total += 1
            if term or trunc:
                break
            if total >= steps:
                Tr[-1] = True  # D4RL's timeouts flag on the cut-off last episode
                break
        episodes.append(
            _Episode(
                np.asarray(Ob, dtype=np.float32),
                np.asarray(A, dtype=np.float32),
                np.asarray(R, dtype=np.float32),
                np.asarray(Te, dtype=bool),
                np.asarray(Tr, dtype=bool),
                ep_seed,
            )
        )
    return episodes


def _mean_return(env, policy: Callable, episodes: int, seed: int) -> float:
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        ret, done = 0.0, False
        while not done:
            obs, r, term, trunc, _ = env.step(np.asarray(policy(obs), dtype=np.float32))
            ret += float(r)
            done = term or trunc
        returns.append(ret)
    return float(np.mean(returns))


def _random_ref_score(env, episodes: int) -> float:
    return _mean_return(
        env, _UniformPolicy(env.action_space, _RANDOM_REF_SEED), episodes, _RANDOM_REF_SEED
    )


def _run_config(run_dir: Path) -> dict[str, Any]:
    from torchrl_spqr.training.checkpoint import load_checkpoint

    return dict(load_checkpoint(run_dir).get("config") or {})


def _episodes_from_run(run_dir: str | os.PathLike, steps: int | None = None) -> list[_Episode]:
    """The replay buffer of an online run (``checkpoint/buffer``) as chronological episodes.

    Order: the ring buffer is unrolled from its writer cursor (oldest first). Boundaries:
    ``("next", "done" | "terminated" | "truncated")``, a change of
    ``("collector", "traj_ids")`` and any break in ``next.observation[t] ==
    observation[t + 1]``; a boundary that is not a termination is a truncation (so the
    trailing incomplete episode is marked truncated). ``steps`` keeps the first ``steps``
    transitions (D4RL's medium-replay stops where the run reached "medium").
    """
    from torchrl_spqr.training.checkpoint import load_checkpoint_data

    run_dir = Path(run_dir)
    # the newest complete checkpoint, verified; the buffer read without unpickling anything
    state, data, ck = load_checkpoint_data(run_dir)
    path = ck / "buffer"
    meta = state.get("buffer_meta") or {}
    if data is None:
        raise ValueError(f"{run_dir} holds no replay buffer (expected {path}).")
    n = int(meta["len"])
    cursor = int(meta.get("cursor", n))
    if n and cursor % n:  # a full ring buffer: the oldest transition sits at the cursor
        order = torch.cat([torch.arange(cursor % n, n), torch.arange(0, cursor % n)])
    else:
        order = torch.arange(n)
    traj = None
    if ("collector", "traj_ids") in data.keys(include_nested=True):
        traj = data.get(("collector", "traj_ids")).reshape(n)[order]
        perm = torch.sort(traj, stable=True).indices  # several envs: group per trajectory
        order, traj = order[perm], traj[perm]
    if steps is not None:
        order = order[: int(steps)]
        traj = None if traj is None else traj[: int(steps)]
    m = order.numel()

    def col(key, dtype):
        return data.get(key)[order].reshape(m, -1).to(dtype).numpy()

    obs = col("observation", torch.float32)
    nxt = col(("next", "observation"), torch.float32)
    act = col("action", torch.float32)
    rew = col(("next", "reward"), torch.float32).reshape(m)
    keys = data.keys(include_nested=True)
    term = (
        col(("next", "terminated"), torch.bool).reshape(m)
        if ("next", "terminated") in keys
        else np.zeros(m, bool)
    )
    trunc = (
        col(("next", "truncated"), torch.bool).reshape(m)
        if ("next", "truncated") in keys
        else np.zeros(m, bool)
    )
    done = (
        col(("next", "done"), torch.bool).reshape(m) if ("next", "done") in keys else term | trunc
    )
    boundary = done | term | trunc
    if m > 1:
        broken = ~np.all(np.isclose(nxt[:-1], obs[1:], rtol=0, atol=1e-6), axis=-1)
        boundary[:-1] |= broken
        if traj is not None:
            t = traj.numpy()
            boundary[:-1] |= t[1:] != t[:-1]
    if m:
        boundary[-1] = True
    trunc = boundary & ~term
    episodes = []
    start = 0
    for end in np.flatnonzero(boundary):
        sl = slice(start, end + 1)
        episodes.append(
            _Episode(
                np.concatenate([obs[sl], nxt[end : end + 1]], axis=0),
                act[sl],
                rew[sl],
                term[sl].copy(),
                trunc[sl].copy(),
            )
        )
        start = end + 1
    return episodes


def _episodes_from_minari(dataset_id: str) -> tuple[list[_Episode], dict[str, Any]]:
    import minari

    if not _exists_locally(dataset_id):
        raise _unavailable(
            dataset_id,
            [f"local Minari dataset {minari_datasets_path() / dataset_id}: not found"],
            [f"build it first: {_guess_build_command(dataset_id)}"],
        )
    _check_hdf5(dataset_id)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = minari.load_dataset(dataset_id)
            raw = list(ds.iterate_episodes())
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise _corrupted(dataset_id, _local_h5(dataset_id), err) from err
    episodes = []
    for ep in raw:
        if not isinstance(ep.observations, np.ndarray):
            raise ValueError(f"{dataset_id}: medium-expert needs array observations.")
        episodes.append(
            _Episode(
                np.asarray(ep.observations, np.float32),
                np.asarray(ep.actions, np.float32),
                np.asarray(ep.rewards, np.float32),
                np.asarray(ep.terminations, bool),
                np.asarray(ep.truncations, bool),
            )
        )
    return episodes, dict(ds.storage.metadata)


def _int_arg(name: str, value: Any, minimum: int, what: str) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        ok, value = True, int(value)
    if not ok or int(value) < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum} ({what}).")
    return int(value)


def _float_arg(name: str, value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not math.isfinite(v):
        raise ValueError(f"{name}={value!r}: expected a finite number ({what}).")
    return v


def _check_env_id(env_id: Any) -> str:
    import gymnasium as gym

    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env_id={env_id!r} (--env): expected a Gymnasium id such as Hopper-v5.")
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        known = ", ".join(gym_id for gym_id, _ in D4RL_ENV_IDS.values())
        raise ValueError(
            f"env_id={env_id!r} (--env) is not a registered Gymnasium environment "
            f"({type(err).__name__}: {err}). Pass a Gymnasium id such as {known}."
        ) from err
    return env_id


def _check_run_dir(run: Any, flag: str) -> Path:
    path = Path(os.fspath(run)).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"{flag} {str(run)!r}: no such folder. Pass the folder of an online run (the "
            "output folder of sota_scripts/sac_ens_spqr, holding checkpoint/state.pt)."
        )
    return path


def _run_error(flag: str, run: Any, err: BaseException, what: str) -> Exception:
    """``err`` with the flag, the folder and what to pass instead.

    The package's own errors (a damaged or unsafe checkpoint: ``CheckpointError``,
    ``safe_io`` errors) keep their class; others become a ValueError.
    """
    detail = str(err).rstrip(". ")
    msg = (
        f"{flag} {str(run)!r}: {what}: {type(err).__name__}: {detail}. Pass the folder of an "
        "online run that saved a checkpoint (sota_scripts/sac_ens_spqr output; the replay "
        "kinds also need the replay buffer saved with it, checkpoint/buffer)."
    )
    if _own_error(err) and not isinstance(err, ValueError):
        with contextlib.suppress(Exception):
            return type(err)(msg)
    return ValueError(msg)


def _own_error(err: BaseException) -> bool:
    return type(err).__module__.split(".")[0] == "torchrl_spqr"


def _check_build_args(
    kind: Any,
    env_id: Any,
    steps: Any,
    policy: Any,
    seed: Any,
    ref_min_score: Any,
    ref_max_score: Any,
    source_run: Any,
    expert_run: Any,
    parts: Any,
    max_episode_steps: Any,
    noise: Any,
    ref_episodes: Any,
) -> dict[str, Any]:
    """Every argument of :func:`build_dataset` checked before anything is built or written.

    Returns the normalised values; raises ValueError (or DatasetUnavailableError for a
    missing part) naming the argument, its value and what to pass instead.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} (--kind): expected one of {', '.join(KINDS)}.")
    out: dict[str, Any] = {}
    out["steps"] = (
        None if steps is None else _int_arg("steps", steps, 1, "--steps: transitions to collect")
    )
    out["seed"] = _int_arg("seed", seed, 0, "--seed")
    out["ref_episodes"] = _int_arg(
        "ref_episodes", ref_episodes, 1, "--ref-episodes: episodes averaged for a reference score"
    )
    out["max_episode_steps"] = (
        None
        if max_episode_steps is None
        else _int_arg("max_episode_steps", max_episode_steps, 1, "--max-episode-steps")
    )
    out["noise"] = _float_arg("noise", noise, "--noise: Gaussian action noise std")
    if out["noise"] < 0:
        raise ValueError(f"noise={noise!r} (--noise): expected a standard deviation >= 0.")
    lo = hi = None
    if ref_min_score is not None:
        lo = _float_arg("ref_min_score", ref_min_score, "--ref-min-score")
    if ref_max_score is not None:
        hi = _float_arg("ref_max_score", ref_max_score, "--ref-max-score")
    if lo is not None and hi is not None and not hi > lo:
        raise ValueError(
            f"ref_min_score={lo} and ref_max_score={hi}: the normalised score "
            "100 * (R - min) / (max - min) needs ref_max_score > ref_min_score."
        )
    out["ref_min_score"], out["ref_max_score"] = lo, hi
    if env_id is not None:
        out["env_id"] = _check_env_id(env_id)
    else:
        out["env_id"] = None

    # arguments the recipe would ignore: an error, not a silent no-op
    ignored = []
    if policy is not None and kind not in ("medium", "expert"):
        ignored.append("policy (--policy-run)")
    if parts is not None and kind != "medium-expert":
        ignored.append("parts (--parts)")
    if source_run is not None and kind not in ("medium-replay", "full-replay"):
        ignored.append("source_run (--source-run)")
    if out["noise"] and kind not in ("medium", "expert"):
        ignored.append("noise (--noise)")
    if steps is not None and kind == "medium-expert":
        ignored.append("steps (--steps)")
    if ignored:
        raise ValueError(
            f"kind={kind!r} does not use {', '.join(ignored)}: drop "
            f"{'it' if len(ignored) == 1 else 'them'}, or pick the kind that reads "
            f"{'it' if len(ignored) == 1 else 'them'} (policy: medium / expert; source_run: "
            "medium-replay / full-replay; parts: medium-expert)."
        )

    if kind in ("random", "medium", "expert") and out["env_id"] is None:
        raise ValueError(f"kind={kind!r} needs env_id (--env), e.g. Hopper-v5.")
    if kind in ("medium", "expert"):
        if policy is None:
            raise ValueError(
                f"kind={kind!r} needs a policy: --policy-run RUN_DIR (an online run folder) "
                "or policy=<callable obs -> action>."
            )
        if isinstance(policy, (str, os.PathLike)):
            _check_run_dir(policy, "--policy-run")
        elif not callable(policy):
            raise ValueError(f"policy={policy!r}: expected a run folder or a callable.")
    if kind == "medium-replay" and source_run is None:
        raise ValueError("kind='medium-replay' needs source_run (--source-run RUN_DIR).")
    if kind == "full-replay" and source_run is None and expert_run is None:
        raise ValueError("kind='full-replay' needs expert_run (--expert-run RUN_DIR).")
    if source_run is not None:
        _check_run_dir(source_run, "--source-run")
    if expert_run is not None:
        _check_run_dir(expert_run, "--expert-run")
    if kind == "medium-expert":
        if isinstance(parts, str) or not isinstance(parts, Sequence) or len(parts) != 2:
            raise ValueError(
                f"parts={parts!r}: kind='medium-expert' needs two dataset ids, "
                "--parts MEDIUM_ID EXPERT_ID."
            )
        for p in parts:
            _check_dataset_id(p)
            if not _exists_locally(p):
                raise _unavailable(
                    p,
                    [f"local Minari dataset {minari_datasets_path() / p}: not found"],
                    [f"build it first: {_guess_build_command(p)}"],
                )
            _check_hdf5(p)
        out["parts"] = list(parts)
    else:
        out["parts"] = None
    return out


def build_dataset(
    dataset_id: str,
    env_id: str | None,
    kind: str,
    *,
    steps: int | None = None,
    policy: Callable[[np.ndarray], np.ndarray] | str | os.PathLike | None = None,
    seed: int = 0,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    source_run: str | None = None,
    expert_run: str | None = None,
    parts: list[str] | None = None,
    max_episode_steps: int | None = None,
    noise: float = 0.0,
    ref_episodes: int = 10,
    overwrite: bool = False,
) -> minari.MinariDataset:
    """Create the Minari dataset ``dataset_id`` locally with D4RL's recipe ``kind``.

    Args:
        dataset_id: Minari id, e.g. ``"local/hopper/medium-v0"``.
        env_id: Gymnasium id (``"Hopper-v5"``); ``None`` takes it from the source run's
            config (replay kinds) or from the first part (``medium-expert``).
        kind: one of :data:`KINDS`:

            - ``random``: uniform random actions, ``steps`` transitions;
            - ``medium`` / ``expert``: roll out ``policy`` (``obs -> action``, or a run
              folder for :func:`load_policy_from_run`) for ``steps`` transitions, plus
              Gaussian noise of std ``noise``;
            - ``medium-replay``: the replay buffer of the online run ``source_run``
              (the first ``steps`` transitions if given);
            - ``full-replay``: the whole replay buffer of the expert run ``expert_run``
              (or ``source_run``);
            - ``medium-expert``: the episodes of ``parts = [medium_id, expert_id]``.

        steps: transitions to collect (default 1,000,000 as in D4RL; whole buffer for the
            replay kinds).
        ref_min_score: default: mean return of a uniform random policy over
            ``ref_episodes`` episodes (fixed seed, so all splits of an env agree).
        ref_max_score: default: the mean return of the expert policy (``expert`` kind,
            ``expert_run``), the expert part's value (``medium-expert``), else D4RL's
            expert reference for the env family (with a warning).
        max_episode_steps: time limit of the env (default: the env's, or the run's).
        overwrite: replace an existing local dataset with the same id: the new one is
            written aside and swapped in only when complete (see the module docstring).

    Raises:
        ValueError: a malformed id (expected ``namespace/name-vN``), an argument out of
            range or unused by ``kind``, an unknown env id, a run folder that is missing or
            holds no checkpoint / replay buffer, reference scores that are not finite or
            with ``ref_max_score <= ref_min_score``. Nothing is written.
        FileExistsError: the id exists and ``overwrite`` is False.
        DatasetUnavailableError / DatasetCorruptedError: a ``parts`` dataset is missing or
            unreadable.

    Terminations and time-limit truncations are stored apart; an episode cut off by
    ``steps`` ends with a truncation. Observations, actions and rewards are float32.
    """
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    t0 = time.perf_counter()
    # Everything is checked before anything is built; nothing is written before the end.
    target = _check_dataset_id(dataset_id)
    args = _check_build_args(
        kind, env_id, steps, policy, seed, ref_min_score, ref_max_score, source_run,
        expert_run, parts, max_episode_steps, noise, ref_episodes,
    )  # fmt: skip
    steps, seed, noise = args["steps"], args["seed"], args["noise"]
    env_id, parts, max_episode_steps = args["env_id"], args["parts"], args["max_episode_steps"]
    ref_min_score, ref_max_score = args["ref_min_score"], args["ref_max_score"]
    ref_episodes = args["ref_episodes"]
    store = minari_datasets_path().expanduser().resolve()
    existing = next(p for p in (store, *store.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"The Minari store {store} is not writable ({existing} is read-only): point "
            "MINARI_DATASETS_PATH at a writable folder."
        )
    _recover_interrupted_builds()
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"Minari dataset {dataset_id!r} already exists at {target} (pass overwrite=True "
                "or --overwrite to replace it)."
            )
        _check_replaceable(dataset_id, target)

    notes: list[str] = []
    ref_max_src = "given" if ref_max_score is not None else None
    ref_min_src = "given" if ref_min_score is not None else None
    env_kwargs: dict[str, Any] = {}

    if kind in ("medium-replay", "full-replay"):
        run = source_run if kind == "medium-replay" else (expert_run or source_run)
        if run is None:
            raise ValueError(
                f"kind={kind!r} needs {'source_run' if kind == 'medium-replay' else 'expert_run'}."
            )
        flag = "--source-run" if run is source_run else "--expert-run"
        try:
            cfg = _run_config(Path(run))
        except Exception as err:  # any failure to read the run, named with its flag
            raise _run_error(flag, run, err, "cannot read its checkpoint") from err
        env_section = cfg.get("env") or {}
        if env_id is None and env_section.get("name"):
            env_id = _check_env_id(env_section.get("name"))
        if max_episode_steps is None and env_section.get("max_episode_steps"):
            max_episode_steps = int(env_section["max_episode_steps"])
        try:
            episodes = _episodes_from_run(run, steps)
        except Exception as err:  # any failure to read the run, named with its flag
            raise _run_error(flag, run, err, "cannot read its replay buffer") from err
        notes.append(f"replay buffer of the online run {Path(run).resolve()}")
        if kind == "full-replay" and ref_max_score is None:
            expert_run = expert_run or run
    elif kind == "medium-expert":
        if not parts or len(parts) != 2:
            raise ValueError("kind='medium-expert' needs parts=[medium_id, expert_id].")
        episodes, metas, counts = [], [], []
        for p in parts:
            eps, meta = _episodes_from_minari(p)
            episodes += eps
            metas.append(meta)
            counts.append(len(eps))
        if env_id is None:
            env_id, env_kwargs = _minari_eval_env(metas[0])
            max_episode_steps = env_kwargs.pop("max_episode_steps", max_episode_steps)
        if ref_min_score is None and _opt_float(metas[0].get("ref_min_score")) is not None:
            ref_min_score, ref_min_src = float(metas[0]["ref_min_score"]), f"from {parts[0]}"
        if ref_max_score is None:
            for p, meta in zip(reversed(parts), reversed(metas)):
                if _opt_float(meta.get("ref_max_score")) is not None:
                    ref_max_score, ref_max_src = float(meta["ref_max_score"]), f"from {p}"
                    break
        notes.append(
            f"concatenation of {parts[0]} ({counts[0]} episodes) and {parts[1]} "
            f"({counts[1]} episodes)"
        )
    else:
        if env_id is None:
            raise ValueError(f"kind={kind!r} needs env_id.")
        steps = 1_000_000 if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1.")
        env = _make_env(env_id, max_episode_steps)
        if kind == "random":
            pol: Callable = _UniformPolicy(env.action_space, seed)
            notes.append("uniform random actions")
        else:
            if policy is None:
                raise ValueError(f"kind={kind!r} needs a policy (callable or run folder).")
            if isinstance(policy, (str, os.PathLike)):
                notes.append(f"deterministic actor of the online run {Path(policy).resolve()}")
                try:
                    policy = load_policy_from_run(policy)
                except Exception as err:  # any failure to read the run, named with its flag
                    raise _run_error("--policy-run", policy, err, "cannot load its actor") from err
            else:
                notes.append(
                    "policy "
                    + (f"of run {policy.run_dir}" if hasattr(policy, "run_dir") else repr(policy))
                )
            pol = policy
            if noise > 0:
                notes.append(f"Gaussian action noise std {noise}")
            if kind == "expert" and ref_max_score is None:
                ref_max_score = _mean_return(env, pol, ref_episodes, _RANDOM_REF_SEED)
                ref_max_src = f"mean return of this policy over {ref_episodes} episodes"
        episodes = _rollout_steps(env, pol, steps, seed, noise)
        env.close()

    if env_id is None:
        raise ValueError("Could not determine the environment id: pass env_id.")
    if not episodes:
        raise ValueError(f"No transitions to write for {dataset_id!r}.")
    env = _make_env(env_id, max_episode_steps, env_kwargs)
    obs_dim = int(np.prod(env.observation_space.shape))
    act_dim = int(np.prod(env.action_space.shape))
    if episodes[0].observations.shape[-1] != obs_dim or episodes[0].actions.shape[-1] != act_dim:
        raise ValueError(
            f"Data has obs/action dims {episodes[0].observations.shape[-1]}/"
            f"{episodes[0].actions.shape[-1]} but {env_id} has {obs_dim}/{act_dim}."
        )
    if ref_min_score is None:
        ref_min_score = _random_ref_score(env, ref_episodes)
        ref_min_src = f"mean return of a uniform random policy over {ref_episodes} episodes"
    if ref_max_score is None and expert_run is not None:
        try:
            expert = load_policy_from_run(expert_run)
        except Exception as err:  # any failure to read the run, named with its flag
            raise _run_error("--expert-run", expert_run, err, "cannot load its actor") from err
        ref_max_score = _mean_return(env, expert, ref_episodes, _RANDOM_REF_SEED)
        ref_max_src = f"mean return of the expert run {expert_run} over {ref_episodes} episodes"
    if ref_max_score is None and _family_of_env(env_id) is not None:
        ref_max_score = D4RL_REF_SCORES[_family_of_env(env_id)][1]
        ref_max_src = "D4RL's published expert score (d4rl/infos.py REF_MAX_SCORE)"
        warnings.warn(
            f"{dataset_id}: no ref_max_score given; using D4RL's expert reference "
            f"{ref_max_score} for {env_id}.",
            stacklevel=2,
        )
    for name, value, src in (
        ("ref_min_score", ref_min_score, ref_min_src),
        ("ref_max_score", ref_max_score, ref_max_src),
    ):
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(
                f"{dataset_id}: {name}={value} ({src}) is not finite: the normalised scores "
                f"would be NaN. Give --{name.replace('_', '-')} explicitly."
            )
    if ref_max_score is not None and not float(ref_max_score) > float(ref_min_score):
        raise ValueError(
            f"{dataset_id}: ref_max_score={ref_max_score} ({ref_max_src}) is not above "
            f"ref_min_score={ref_min_score} ({ref_min_src}): normalised scores "
            "100 * (R - min) / (max - min) would be undefined or inverted. Give "
            "--ref-min-score / --ref-max-score explicitly (or a better --expert-run)."
        )

    obs_space = gym.spaces.Box(
        env.observation_space.low.astype(np.float32),
        env.observation_space.high.astype(np.float32),
        env.observation_space.shape,
        np.float32,
    )
    buffers = [
        EpisodeBuffer(
            id=i,
            seed=ep.seed,
            observations=ep.observations,
            actions=ep.actions,
            rewards=ep.rewards,
            terminations=ep.terminations,
            truncations=ep.truncations,
        )
        for i, ep in enumerate(episodes)
    ]
    n_steps = sum(len(ep) for ep in episodes)
    recipe = {
        "kind": kind,
        "env_id": env_id,
        "max_episode_steps": env.spec.max_episode_steps if env.spec else None,
        "steps": n_steps,
        "episodes": len(episodes),
        "seed": seed,
        "noise": noise,
        "source_run": str(source_run) if source_run else None,
        "expert_run": str(expert_run) if expert_run else None,
        "parts": list(parts) if parts else None,
        "ref_min_score_source": ref_min_src,
        "ref_max_score_source": ref_max_src,
    }
    description = (
        f"D4RL-style '{kind}' dataset on {env_id} built by torchrl_spqr.datasets: "
        + "; ".join(notes)
        + f". {n_steps} transitions in {len(episodes)} episodes, seed {seed}. "
        f"ref_min_score: {ref_min_src}; ref_max_score: {ref_max_src}. "
        f"Recipe: {json.dumps(recipe)}"
    )
    kw: dict[str, Any] = {}
    if ref_max_score is not None:  # Minari records the reference scores only with a max
        kw.update(ref_min_score=float(ref_min_score), ref_max_score=float(ref_max_score))
    extra = {"torchrl_spqr_recipe": json.dumps(recipe)}
    if ref_max_score is None:
        extra["ref_min_score"] = float(ref_min_score)
    # Written aside (a private store in the hidden staging folder), then swapped in.
    stage, stage_lock = _new_stage(dataset_id)
    try:
        with _minari_store(stage / "new"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _write_minari_dataset(
                dataset_id,
                buffers,
                env=env.spec,
                eval_env=env.spec,
                algorithm_name=f"torchrl_spqr.datasets/{kind}",
                author="torchrl_spqr",
                author_email="n/a",
                code_permalink="torchrl_spqr/datasets.py",
                action_space=env.action_space,
                observation_space=obs_space,
                description=description,
                extra_metadata=extra,
                **kw,
            )
        _fsync_tree(stage / "new")
        (stage / "complete").write_text(dataset_id)
        with _file_lock(_id_lock(dataset_id)):
            try:
                _swap_in(dataset_id, target, stage, overwrite)
            finally:
                _settle_stage(stage, dataset_id, target, roll_forward=False)
    finally:
        if target.exists() or not (stage / "old").exists():  # else: left for recovery
            shutil.rmtree(stage, ignore_errors=True)  # a no-op after _settle_stage
        stage_lock.close()
        env.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = minari.load_dataset(dataset_id)
    ds.build_time_s = time.perf_counter() - t0  # type: ignore[attr-defined]
    return ds


def _write_minari_dataset(dataset_id: str, buffers, extra_metadata: dict[str, Any], **kwargs):
    """``minari.create_dataset_from_buffers`` plus our metadata (into the current store)."""
    import minari

    ds = minari.create_dataset_from_buffers(dataset_id, buffers, **kwargs)
    ds.storage.update_metadata(extra_metadata)
    return ds


def _fsync_tree(folder: Path) -> None:
    """Flush the files under ``folder`` to disk (a rename must not outrun its data)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with contextlib.suppress(OSError), open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _swap_in(dataset_id: str, target: Path, stage: Path, overwrite: bool) -> None:
    """Move the complete build ``stage/new/<id>`` to ``target``; the old one aside first.

    Two renames inside the store (atomic each): ``target -> stage/old`` then
    ``stage/new/<id> -> target``; ``stage`` (and the old dataset with it) is deleted
    afterwards by :func:`_settle_stage`, which also moves the old one back if the second
    rename did not happen. Call with the id's lock held.
    """
    new = stage / "new" / dataset_id
    if target.exists() or target.is_symlink():
        if not overwrite:  # appeared while this build ran
            raise FileExistsError(
                f"Minari dataset {dataset_id!r} appeared at {target} while this build ran "
                "(pass overwrite=True or --overwrite to replace it)."
            )
        _check_replaceable(dataset_id, target)
        _ensure_namespaces(dataset_id)
        os.rename(target, stage / "old")
    else:
        _ensure_namespaces(dataset_id)
    os.rename(new, target)


# --------------------------------------------------------------------------- CLI
def _format_row(dataset_id: str, meta: dict[str, Any]) -> str:
    def fmt(x):
        v = _opt_float(x)
        return "-" if v is None else f"{v:.2f}"

    env = "?"
    with contextlib.suppress(Exception):
        env = _minari_eval_env(meta)[0]
    return (
        f"{dataset_id:<40} {env:<16} {int(meta.get('total_episodes', 0)):>8} "
        f"{int(meta.get('total_steps', 0)):>10} {fmt(meta.get('dataset_size')):>9} "
        f"{fmt(meta.get('ref_min_score')):>10} {fmt(meta.get('ref_max_score')):>10}"
    )


def _cmd_list(args) -> int:
    import minari

    _recover_interrupted_builds()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets = minari.list_local_datasets()
    print(f"Minari store: {minari_datasets_path()}")
    if not datasets:
        print("(no local datasets)")
        return 0
    print(
        f"{'id':<40} {'env':<16} {'episodes':>8} {'steps':>10} {'size_MB':>9} "
        f"{'ref_min':>10} {'ref_max':>10}"
    )
    for ds_id, meta in sorted(datasets.items()):
        print(_format_row(ds_id, dict(meta)))
    return 0


def _cmd_info(args) -> int:
    _check_dataset_id(args.id)
    _recover_interrupted_builds()
    if not _exists_locally(args.id):
        print(f"{args.id}: not found under {minari_datasets_path()}", file=sys.stderr)
        return 1
    _check_hdf5(args.id)
    meta = _minari_metadata(args.id)
    env_id, env_kwargs = _minari_eval_env(meta)
    print(f"id:              {args.id}")
    print(f"path:            {minari_datasets_path() / args.id}")
    print(f"eval env:        {env_id} {env_kwargs if env_kwargs else ''}")
    for k in (
        "total_episodes",
        "total_steps",
        "dataset_size",
        "ref_min_score",
        "ref_max_score",
        "algorithm_name",
        "minari_version",
        "description",
    ):
        if k in meta:
            print(f"{k + ':':<16} {meta[k]}")
    return 0


def _cmd_build(args) -> int:
    torch.set_num_threads(1)  # one observation at a time: more threads only add overhead
    t0 = time.perf_counter()
    ds = build_dataset(
        args.id,
        args.env,
        args.kind,
        steps=args.steps,
        policy=args.policy_run,
        seed=args.seed,
        ref_min_score=args.ref_min_score,
        ref_max_score=args.ref_max_score,
        source_run=args.source_run,
        expert_run=args.expert_run,
        parts=args.parts,
        max_episode_steps=args.max_episode_steps,
        noise=args.noise,
        ref_episodes=args.ref_episodes,
        overwrite=args.overwrite,
    )
    meta = ds.storage.metadata
    print(
        f"built {args.id} at {minari_datasets_path() / args.id}: {meta['total_steps']} steps, "
        f"{meta['total_episodes']} episodes, ref_min_score={meta.get('ref_min_score')}, "
        f"ref_max_score={meta.get('ref_max_score')} in {time.perf_counter() - t0:.1f}s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchrl_spqr.datasets",
        description="Build, list and inspect local Minari datasets (D4RL recipe).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="create a local Minari dataset")
    b.add_argument("--id", required=True, help="Minari id, e.g. local/hopper/random-v0")
    b.add_argument("--env", default=None, help="Gymnasium id, e.g. Hopper-v5")
    b.add_argument("--kind", required=True, choices=KINDS)
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--policy-run", default=None, help="online run folder (medium / expert)")
    b.add_argument("--source-run", default=None, help="online run folder (replay kinds)")
    b.add_argument("--expert-run", default=None, help="expert run (full-replay; ref_max_score)")
    b.add_argument("--parts", nargs=2, default=None, metavar=("MEDIUM_ID", "EXPERT_ID"))
    b.add_argument("--ref-min-score", type=float, default=None)
    b.add_argument("--ref-max-score", type=float, default=None)
    b.add_argument("--ref-episodes", type=int, default=10)
    b.add_argument("--max-episode-steps", type=int, default=None)
    b.add_argument("--noise", type=float, default=0.0, help="Gaussian action noise std")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the dataset of this id (the new one is built aside and swapped in "
        "only when complete)",
    )
    b.set_defaults(func=_cmd_build)
    ls = sub.add_parser("list", help="local datasets with sizes and reference scores")
    ls.set_defaults(func=_cmd_list)
    info = sub.add_parser("info", help="metadata of one local dataset")
    info.add_argument("id")
    info.set_defaults(func=_cmd_info)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (DatasetUnavailableError, OSError, ValueError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not _own_error(err):
            raise  # not an input problem: a bug, with its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: a dataset is swapped in only once complete, so the id still holds "
            "its previous dataset (or, if the swap was done, the new one)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
