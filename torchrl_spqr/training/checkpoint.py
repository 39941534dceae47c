"""Atomic, safely loadable checkpoints and resumable logs.

A checkpoint is a folder ``checkpoint/`` in the run folder holding

- ``state.pt``: nested dicts of tensors and plain Python values (module and
  optimiser state dicts, RNG states, counters), loaded with
  ``torch.load(weights_only=True)``: no arbitrary unpickling;
- ``buffer/``: the replay buffer's content as a tensordict memmap plus the
  writer cursor in ``state.pt``.

It is written into ``checkpoint.tmp/`` and renamed over the previous one, so
an interruption while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

__all__ = [
    "capture_rng",
    "restore_rng",
    "save_checkpoint",
    "load_checkpoint",
    "save_buffer",
    "load_buffer",
    "truncate_csv",
]


def capture_rng() -> dict[str, Any]:
    """RNG states of torch, numpy and Python's ``random``, as weights-only-loadable values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _to_lists(random.getstate()),
    }


def restore_rng(state: dict[str, Any]) -> None:
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


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def save_buffer(buffer, path: Path) -> dict[str, int]:
    """Write the buffer's content as a memmap under ``path``; returns its cursor metadata."""
    n = len(buffer)
    meta = {"len": n, "cursor": int(getattr(buffer._writer, "_cursor", n))}  # noqa: SLF001
    if n:
        data = buffer.storage[:n]
        # copy_existing: a memmap storage hands out tensors that already live in its files
        data.memmap(path, num_threads=0, copy_existing=True)
    return meta


def load_buffer(buffer, path: Path, meta: dict[str, int]) -> None:
    """Refill an empty buffer from :func:`save_buffer`'s output."""
    if len(buffer):
        raise RuntimeError("load_buffer expects an empty replay buffer.")
    if meta["len"]:
        data = TensorDict.load_memmap(path).clone()
        buffer.extend(data)
        buffer._writer._cursor = meta["cursor"]  # noqa: SLF001


def save_checkpoint(run_dir: Path, state: dict[str, Any], buffer=None) -> Path:
    """Atomically write ``state`` (and the buffer) to ``run_dir/checkpoint``."""
    run_dir = Path(run_dir)
    final = run_dir / "checkpoint"
    tmp = run_dir / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = dict(state)
    if buffer is not None:
        state["buffer_meta"] = save_buffer(buffer, tmp / "buffer")
    torch.save(state, tmp / "state.pt")
    old = run_dir / "checkpoint.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load_checkpoint(run_dir: Path, buffer=None) -> dict[str, Any]:
    """Load ``run_dir/checkpoint`` with ``weights_only=True`` (and refill ``buffer``)."""
    run_dir = Path(run_dir)
    final = run_dir / "checkpoint"
    if not (final / "state.pt").exists():
        old = run_dir / "checkpoint.old"  # interrupted between the two renames
        if (old / "state.pt").exists():
            final = old
        else:
            raise FileNotFoundError(
                f"No checkpoint in {run_dir} (expected {final}/state.pt); cannot resume."
            )
    state = torch.load(final / "state.pt", weights_only=True, map_location="cpu")
    if buffer is not None and "buffer_meta" in state:
        load_buffer(buffer, final / "buffer", state["buffer_meta"])
    return state


def truncate_csv(path: Path, max_step: int, step_field: str | int = 0, header: bool = True) -> None:
    """Drop the rows of ``path`` whose step is above ``max_step`` (used on resume)."""
    path = Path(path)
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    head, body = (rows[0], rows[1:]) if header else (None, rows)
    idx = head.index(step_field) if (header and isinstance(step_field, str)) else int(step_field)
    kept = [r for r in body if r and float(r[idx]) <= max_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        if head is not None:
            w.writerow(head)
        w.writerows(kept)
    os.replace(tmp, path)
