"""Atomic, verified, safely loadable checkpoints and resumable logs.

A checkpoint is a folder ``checkpoint/`` in the run folder holding

- ``state.pt``: nested dicts of tensors and plain Python values (module and
  optimiser state dicts, RNG states, counters, the config), loaded with
  ``torch.load(weights_only=True)``: no arbitrary unpickling;
- ``buffer/``: the replay buffer's content as a tensordict memmap (the writer
  cursor is in ``state.pt``), loaded by :mod:`torchrl_spqr.safe_io`, which
  refuses any file a memmap of plain tensors does not hold (a pickle first of
  all) and any tensor file whose size does not match its ``meta.json``;
- ``manifest.json``, written last: the size and SHA-256 of every other file.
  A checkpoint folder with a manifest is complete; on load every file is
  checked against it, so a truncated or altered file is refused, naming it.

A save writes ``checkpoint.tmp/`` (manifest last, files synced to disk), moves
``checkpoint/`` to ``checkpoint.old/``, renames ``checkpoint.tmp/`` to
``checkpoint/`` and removes ``checkpoint.old/``. A kill at any instant leaves
at least one complete checkpoint: loading takes the newest complete one of
``checkpoint.tmp/`` (complete only once its manifest is written, i.e. a save
killed between its renames), ``checkpoint/`` and ``checkpoint.old/``, and
falls back to the next one (with a warning) when a newer one fails
verification. The next save first finishes an interrupted one, so it never
deletes the newest complete checkpoint before its successor is complete.

Checkpoints written before the manifest existed still load, with a warning that
they cannot be verified (their memmap sizes are still checked against
``meta.json`` and their state file still read with ``weights_only=True``).

What comes from TorchRL, and what does not (TorchRL 0.14.1, tensordict 0.14.3):

- The RNG states are ``torchrl.checkpoint.GlobalRNGState``'s (Python, NumPy, torch
  CPU and, once initialised, CUDA / XPU / MPS), a dict that loads with
  ``weights_only=True``. Checkpoints with this package's older layout still restore.
- The replay buffer's write position is its writer's ``state_dict()`` /
  ``load_state_dict()`` (cursor and write count), not a private attribute.
- The buffer's content is not saved with ``ReplayBuffer.dumps`` / ``loads``:
  ``ReplayBuffer.loads`` (``torchrl/data/replay_buffers/replay_buffers/base.py``)
  calls ``_load_prefetch_state``, which ``pickle.load``-s ``prefetch.pkl``, a file
  ``ReplayBuffer.dumps`` always writes (``_dump_prefetch_state``), and it
  ``torch.load``-s ``transform.t`` without ``weights_only=True``; the storage's
  ``TensorStorageCheckpointer.loads`` (``torchrl/data/replay_buffers/checkpointers.py``)
  calls ``TensorDict.load_memmap(path)`` without ``allow_pickle=False``, which in
  tensordict 0.14 still unpickles a pickled non-tensor entry (with a FutureWarning).
  A planted file in a run folder would run code on resume.
- The folder protocol is not ``torchrl.checkpoint.Checkpoint``: its ``save``
  (``torchrl/checkpoint/_checkpoint.py``) publishes the new folder with
  ``Checkpoint._publish_path``, which renames the previous checkpoint to a
  randomly named ``.checkpoint.backup-<uuid>`` and deletes it right after, so a
  kill between its two renames leaves no checkpoint where ``Checkpoint.load``
  looks (nothing finds the backup); its manifest lists file names without sizes
  or hashes (a truncated file is not detected) and nothing is synced to disk
  before the rename; and it saves a replay buffer through
  ``DumpLoadCheckpointAdapter``, i.e. ``ReplayBuffer.dump`` / ``load`` (the
  pickle above).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrl.checkpoint import GlobalRNGState

from torchrl_spqr import safe_io

__all__ = [
    "capture_rng",
    "restore_rng",
    "CheckpointError",
    "has_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "load_checkpoint_data",
    "verify_checkpoint",
    "save_buffer",
    "load_buffer",
    "truncate_csv",
]


def capture_rng() -> dict[str, Any]:
    """RNG states of Python, NumPy, torch (CPU and initialised accelerators), weights-only loadable.

    TorchRL's :class:`torchrl.checkpoint.GlobalRNGState` ``state_dict()``.
    """
    return GlobalRNGState().state_dict()


def restore_rng(state: dict[str, Any]) -> None:
    """Restore :func:`capture_rng`'s states (or this package's older layout of them).

    A CUDA / XPU / MPS state saved on a machine with that device is skipped, with a
    warning, where the device is not available (a GPU run resumed on a CPU).
    """
    if "torch_cpu" not in state:  # before GlobalRNGState: {"torch", "numpy": {...}, "python"}
        _restore_rng_v0(state)
        return
    state = dict(state)
    for key, ok in (
        ("torch_cuda", torch.cuda.is_available),
        ("torch_xpu", lambda: hasattr(torch, "xpu") and torch.xpu.is_available()),
        ("torch_mps", torch.backends.mps.is_available),
    ):
        if key in state and not ok():
            del state[key]
            warnings.warn(
                f"The checkpoint holds a {key[6:].upper()} RNG state but this machine has no "
                f"{key[6:].upper()} device: it is not restored (the run continues on another "
                "device, so its random draws differ from an uninterrupted run's).",
                UserWarning,
                stacklevel=2,
            )
    GlobalRNGState().load_state_dict(state)


def _restore_rng_v0(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    random.setstate(_to_tuples(state["python"]))


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def save_buffer(buffer, path: Path) -> dict[str, Any]:
    """Write the buffer's content as a memmap under ``path``; returns its metadata.

    The metadata (kept in ``state.pt``): ``len``, the writer's ``cursor`` and the
    writer's ``state_dict()`` (TorchRL's: cursor and write count).
    """
    n = len(buffer)
    writer = dict(buffer.writer.state_dict())
    meta = {"len": n, "cursor": int(writer.get("_cursor", n)), "writer": writer}
    if n:
        data = buffer.storage[:n]
        # copy_existing: a memmap storage hands out tensors that already live in its files
        data.memmap(path, num_threads=0, copy_existing=True)
    return meta


def load_buffer(buffer, path: Path, meta: dict[str, Any], data=None) -> None:
    """Refill an empty buffer from :func:`save_buffer`'s output (loaded safely)."""
    if len(buffer):
        raise RuntimeError("load_buffer expects an empty replay buffer.")
    if meta["len"]:
        if data is None:
            data = _read_buffer(Path(path), meta)
        capacity = _capacity(buffer)
        if capacity is not None and meta["len"] > capacity:
            raise CheckpointError(
                f"The checkpoint's replay buffer holds {meta['len']} transitions, more than "
                f"this run's replay_buffer.size={capacity}: resume with the size it was "
                "saved with."
            )
        buffer.extend(data.clone())
        # a checkpoint from before the writer's state_dict was saved has the cursor only
        buffer.writer.load_state_dict(meta.get("writer") or {"_cursor": int(meta["cursor"])})


def _capacity(buffer) -> int | None:
    try:
        return int(buffer.storage.max_size)
    except (AttributeError, TypeError, ValueError):  # pragma: no cover
        return None


def _read_buffer(path: Path, meta: dict[str, int]):
    try:
        data = safe_io.load_memmap(path)
    except safe_io.CorruptFileError as err:
        raise CheckpointError(str(err)) from None
    n = int(meta["len"])
    if data.ndim < 1 or data.shape[0] < n:
        raise CheckpointError(
            f"{path} holds {data.shape[0] if data.ndim else 0} transitions; its state file "
            f"says {n}: the checkpoint is incomplete."
        )
    return data[:n]


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, damaged, or does not match the run resuming it."""


MANIFEST = "manifest.json"
_FORMAT = 1


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. directories on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_manifest(folder: Path) -> None:
    """Sync every file of ``folder`` to disk, then write its manifest (last)."""
    files = {}
    for p in _files(folder):
        _fsync(p)
        files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    for d in sorted({p.parent for p in folder.rglob("*")} | {folder}):
        _fsync(d)
    part = folder / (MANIFEST + ".part")
    part.write_text(json.dumps({"format": _FORMAT, "files": files}, indent=1))
    _fsync(part)
    os.replace(part, folder / MANIFEST)
    _fsync(folder)


def verify_checkpoint(folder: str | os.PathLike, *, checksum: bool = True) -> bool:
    """Check ``folder`` against its manifest; ``False`` for a checkpoint written without one.

    Raises :class:`CheckpointError` naming the first missing, truncated or altered file
    (sizes always; SHA-256 too with ``checksum=True``).
    """
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.exists():
        return False
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        items = [(str(k), int(v["size"]), str(v["sha256"])) for k, v in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{mpath} is unreadable ({err}).") from None
    for rel, size, digest in items:
        p = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise CheckpointError(f"{mpath} names a file outside the checkpoint: {rel!r}.")
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (listed in {mpath}).")
        actual = p.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"{p} holds {actual} bytes, {size} were written: the file is truncated "
                "or was changed after the checkpoint was saved."
            )
        if checksum and _sha256(p) != digest:
            raise CheckpointError(
                f"{p} does not match its SHA-256 in {mpath}: the file was damaged or changed "
                "after the checkpoint was saved."
            )
    return True


def _candidates(run_dir: Path) -> list[Path]:
    """Checkpoint folders of ``run_dir``, newest first (see the module docstring)."""
    out = []
    tmp = run_dir / "checkpoint.tmp"
    if (tmp / MANIFEST).is_file():  # a save killed between its renames (else: partial)
        out.append(tmp)
    for name in ("checkpoint", "checkpoint.old"):
        if (run_dir / name).is_dir():
            out.append(run_dir / name)
    return out


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds any checkpoint folder (complete or not) to resume from."""
    return bool(_candidates(Path(run_dir)))


def _load_one(folder: Path, with_buffer: bool):
    verified = verify_checkpoint(folder)
    if not verified:
        if not (folder / "state.pt").is_file():
            raise CheckpointError(f"{folder} is incomplete: no state.pt and no {MANIFEST}.")
        warnings.warn(
            f"{folder} was written without a {MANIFEST} (by an older torchrl_spqr): "
            "its files cannot be verified against what was saved.",
            UserWarning,
            stacklevel=3,
        )
    try:
        state = safe_io.load_state(folder / "state.pt")
    except safe_io.CorruptFileError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{folder / 'state.pt'} is not a checkpoint state (a dict).")
    data = None
    meta = state.get("buffer_meta")
    if with_buffer and meta and meta.get("len"):
        data = _read_buffer(folder / "buffer", meta)
    return state, data


def load_checkpoint_data(run_dir: str | os.PathLike, *, buffer: bool = True):
    """``(state, buffer_data, folder)`` of the newest complete checkpoint of ``run_dir``.

    ``buffer_data`` is the replay buffer's first ``buffer_meta["len"]`` transitions as a
    memmap-backed TensorDict (``None`` without a buffer or with ``buffer=False``). A newer
    checkpoint that fails verification is skipped with a warning naming the file; a
    file that could execute code (a pickle in the buffer folder) raises
    :class:`~torchrl_spqr.safe_io.UnsafeFileError` at once.
    """
    run_dir = Path(run_dir)
    cands = _candidates(run_dir)
    if not cands:
        raise FileNotFoundError(
            f"No checkpoint in {run_dir} (expected {run_dir / 'checkpoint'}/state.pt); "
            "cannot resume."
        )
    errors: list[str] = []
    for folder in cands:
        try:
            state, data = _load_one(folder, buffer)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if errors:
            warnings.warn(
                "Refused the newer checkpoint(s): "
                + " | ".join(errors)
                + f" -- loading the older complete checkpoint {folder}.",
                UserWarning,
                stacklevel=2,
            )
        return state, data, folder
    raise CheckpointError(
        f"No complete checkpoint in {run_dir}: "
        + " | ".join(errors)
        + " Delete the damaged folder(s) to start over, or restore them from a backup."
    )


def load_checkpoint(run_dir: Path, buffer=None) -> dict[str, Any]:
    """Load the newest complete checkpoint of ``run_dir`` (and refill an empty ``buffer``)."""
    state, data, folder = load_checkpoint_data(run_dir, buffer=buffer is not None)
    if buffer is not None and "buffer_meta" in state:
        load_buffer(buffer, folder / "buffer", state["buffer_meta"], data=data)
    return state


def _finish_interrupted_save(run_dir: Path) -> None:
    """Promote a complete ``checkpoint.tmp/`` left by a save killed between its renames."""
    tmp, final, old = (run_dir / n for n in ("checkpoint.tmp", "checkpoint", "checkpoint.old"))
    if not (tmp / MANIFEST).is_file():
        return
    try:
        verify_checkpoint(tmp, checksum=False)
    except CheckpointError:
        return  # damaged: the save below replaces it
    _swap_in(run_dir, tmp, final, old)


def _swap_in(run_dir: Path, tmp: Path, final: Path, old: Path) -> None:
    """Make the complete ``tmp`` the checkpoint: ``final`` -> ``old``, ``tmp`` -> ``final``.

    At every instant one complete checkpoint exists (``final``, or ``old`` and
    ``tmp`` between the two renames); ``old`` is deleted only once ``tmp`` is in place.
    """
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(run_dir)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(run_dir: Path, state: dict[str, Any], buffer=None) -> Path:
    """Atomically write ``state`` (and the buffer) to ``run_dir/checkpoint``."""
    run_dir = Path(run_dir)
    final = run_dir / "checkpoint"
    tmp = run_dir / "checkpoint.tmp"
    old = run_dir / "checkpoint.old"
    run_dir.mkdir(parents=True, exist_ok=True)
    _finish_interrupted_save(run_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = dict(state)
    if buffer is not None:
        state["buffer_meta"] = save_buffer(buffer, tmp / "buffer")
    torch.save(state, tmp / "state.pt")
    _write_manifest(tmp)  # from here on checkpoint.tmp/ is complete
    _swap_in(run_dir, tmp, final, old)
    return final


def truncate_csv(
    path: Path, max_step: int, step_field: str | int = 0, header: bool = True
) -> float | None:
    """Drop the rows of ``path`` whose step is above ``max_step`` (used on resume).

    A last line without its newline (the process was killed while writing it) is
    dropped too, as is any row whose step does not parse. Returns the step of the
    last row kept (``None`` if none).
    """
    path = Path(path)
    if not path.exists():
        return None
    with path.open(newline="") as f:
        text = f.read()
    if not text:
        return None
    lines = text.splitlines(keepends=True)
    if not lines[-1].endswith(("\n", "\r")):
        lines = lines[:-1]  # cut off mid-row
    rows = list(csv.reader(lines))
    if not rows:
        return None
    head, body = (rows[0], rows[1:]) if header else (None, rows)
    if head is not None and isinstance(step_field, str) and step_field not in head:
        return None  # not a file this package wrote: leave it alone
    idx = head.index(step_field) if (header and isinstance(step_field, str)) else int(step_field)
    kept, last = [], None
    for r in body:
        try:
            step = float(r[idx])
        except (IndexError, ValueError):
            continue
        if step <= max_step and (head is None or len(r) == len(head)):
            kept.append(r)
            last = step
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        if head is not None:
            w.writerow(head)
        w.writerows(kept)
    os.replace(tmp, path)
    return last
