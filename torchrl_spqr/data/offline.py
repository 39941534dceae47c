"""Offline RL data: load D4RL / Minari datasets through TorchRL's own dataset classes.

Two sources:

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

Local datasets are built by :mod:`torchrl_spqr.data.builder` (command line:
``python -m torchrl_spqr.data build ...``). A local dataset whose HDF5 file or metadata
cannot be read raises :class:`DatasetCorruptedError` naming the file; recorded reference
scores that are not finite, or with ``ref_max_score <= ref_min_score``, raise a
``ValueError`` on load rather than give NaN or inverted normalised scores.

Only safe loaders are used: ``torch.load(weights_only=True)``, tensordict memmaps and HDF5.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from torchrl_spqr.data.errors import DatasetCorruptedError, DatasetUnavailableError, _unavailable
from torchrl_spqr.data.scores import (
    _ref_scores,
    d4rl_env_id,
    d4rl_env_kwargs,
    d4rl_ref_scores,
    normalized_score,
    parse_d4rl_id,
)
from torchrl_spqr.data.store import (
    _check_dataset_id,
    _check_hdf5,
    _exists_locally,
    _file_lock,
    _guess_build_command,
    _h5_leaves,
    _local_h5,
    _minari_eval_env,
    _minari_metadata,
    _recover_interrupted_builds,
    minari_datasets_path,
)

if TYPE_CHECKING:  # pragma: no cover
    import torchrl.data

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "DatasetCorruptedError",
    "DatasetUnavailableError",
    "OfflineData",
    "load_offline_dataset",
]

#: Seconds a remote download may block on one socket operation before failing.
DOWNLOAD_TIMEOUT_S = float(os.environ.get("TORCHRL_SPQR_DOWNLOAD_TIMEOUT", "30"))


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


@contextlib.contextmanager
def _network_timeout(seconds: float = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    """Bound every blocking socket operation of a download (no long hang without network)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


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


def _cast_float64_on_sample(rb) -> None:
    """Append ``DoubleToFloat`` for every float64 entry, so samples are float32."""
    from torchrl.envs import DoubleToFloat

    td = _storage_td(rb)
    keys = [
        k for k, v in td.items(include_nested=True, leaves_only=True) if v.dtype == torch.float64
    ]
    if keys:
        rb.append_transform(DoubleToFloat(in_keys=keys, out_keys=keys))
