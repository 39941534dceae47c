"""The local Minari store: ids, paths, safe swaps of whole datasets, reading what it holds.

Ids have Minari's form ``namespace/name-vN`` (namespaces may nest; letters, digits, ``_``
and ``-``): :func:`_check_dataset_id` refuses an id with no namespace or version, an
absolute path, ``.`` / ``..`` / empty components, or one whose folder would resolve outside
the store. A dataset is written aside, in the store's hidden folder ``.torchrl_spqr_build/``,
and moved to its id only once complete (:func:`_swap_in`): the old one aside, the new one
into place, then the old one deleted. A build killed at any instant leaves the id holding
either its previous dataset or the complete new one; :func:`_recover_interrupted_builds`
(run by every build, load, ``list`` and ``info``) finishes or undoes an interrupted swap.

A local dataset whose HDF5 file or metadata cannot be read raises
:class:`~torchrl_spqr.data.errors.DatasetCorruptedError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from torchrl_spqr.data.errors import DatasetCorruptedError
from torchrl_spqr.data.scores import _D4RL_ID, D4RL_ENV_IDS, KINDS, parse_d4rl_id

__all__ = ["minari_datasets_path"]


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

#: Hidden folder of the Minari store where the builder writes a dataset before
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
        f"Rebuild it (python -m torchrl_spqr.data build ... --id {dataset_id} --overwrite), "
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
    return f"python -m torchrl_spqr.data build --env {env} --kind {kind}{extra} --id {local_id}"


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


def _h5_leaves(obj, prefix: tuple[str, ...] = ()):
    """``(path, array)`` for the numeric datasets under an HDF5 dataset or group."""
    import h5py

    if isinstance(obj, h5py.Dataset):
        if obj.dtype.kind in "biuf":
            yield prefix, np.asarray(obj[()])
        return
    for k in obj:
        yield from _h5_leaves(obj[k], (*prefix, k))


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
