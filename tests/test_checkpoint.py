"""Checkpoint round trips of the replay buffer for both storages (tensor and memmap)."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, ReplayBuffer

from torchrl_spqr.training.checkpoint import load_checkpoint, save_checkpoint


@pytest.mark.parametrize("storage", ["tensor", "memmap"])
def test_buffer_round_trip(tmp_path, storage):
    def make(d):
        st = LazyTensorStorage(50) if storage == "tensor" else LazyMemmapStorage(50, scratch_dir=d)
        return ReplayBuffer(storage=st, batch_size=4)

    buf = make(tmp_path / "scratch")
    data = TensorDict({"obs": torch.randn(30, 3), "next": {"r": torch.randn(30, 1)}}, [30])
    buf.extend(data)
    save_checkpoint(tmp_path / "run", {"counters": {"frames": 30}}, buf)
    save_checkpoint(tmp_path / "run", {"counters": {"frames": 30}}, buf)  # overwrite is atomic too
    fresh = make(tmp_path / "scratch2")
    ck = load_checkpoint(tmp_path / "run", fresh)
    assert ck["counters"]["frames"] == 30
    assert len(fresh) == 30
    torch.testing.assert_close(fresh.storage[:30]["obs"], data["obs"])
    torch.testing.assert_close(fresh.storage[:30]["next", "r"], data["next", "r"])
    fresh.extend(data[:5])  # the write cursor continues where it was
    torch.testing.assert_close(fresh.storage[30:35]["obs"], data["obs"][:5])
