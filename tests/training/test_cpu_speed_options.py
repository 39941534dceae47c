"""The scripts' CPU speed options: ``network.matmul_dtype`` and ``retain_freed_memory``."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from torchrl_spqr.training import builders as B
from torchrl_spqr.training import common as C
from torchrl_spqr.training.config import ConfigError, resolve_config
from torchrl_spqr.training.malloc import retain_freed_memory
from torchrl_spqr.training.population.update import PopulationUpdate

CFG = {
    "algorithm": "sac_ens",
    "env": {"name": "Pendulum-v1", "max_episode_steps": 20},
    "network": {"ensemble_size": 3, "hidden_sizes": [16, 16]},
    "spqr": {"beta": 1.0, "pairs": "data", "diagnostics_interval": 0},
}


def _cfg(**network):
    return {**CFG, "network": {**CFG["network"], **network}}


def test_defaults_keep_full_precision_and_retain_freed_memory():
    cfg = resolve_config(CFG, "online")
    assert cfg.network.matmul_dtype is None
    assert cfg.retain_freed_memory is True


@pytest.mark.parametrize(
    "network, message",
    [
        ({"matmul_dtype": "float32"}, "network.matmul_dtype"),
        ({"matmul_dtype": "bf16"}, "network.matmul_dtype"),
        ({"matmul_dtype": "bfloat16", "layer_norm": True}, "needs plain ReLU critics"),
        ({"matmul_dtype": "bfloat16", "dropout": 0.1}, "needs plain ReLU critics"),
    ],
)
def test_bad_matmul_dtype_is_named(network, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(_cfg(**network), "online")


def test_retain_freed_memory_must_be_a_bool():
    with pytest.raises(ConfigError, match="retain_freed_memory"):
        resolve_config({**CFG, "retain_freed_memory": "often"}, "online")


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_builder_sets_the_losses_precision(dtype):
    cfg = resolve_config(_cfg(matmul_dtype=dtype), "online")
    env = B.make_environment(cfg, seed=0)
    try:
        actor = B.make_actor(cfg, env)
        loss, base = B.make_loss_module(cfg, actor, B.make_critics(cfg, env), env.action_spec)
    finally:
        env.close()
    want = None if dtype is None else torch.bfloat16
    assert base.critic_matmul_dtype is want
    # a population's template (a deep copy of agent 0's loss) keeps it
    pop = PopulationUpdate([loss])
    assert pop.template.loss_module.critic_matmul_dtype is want


@pytest.mark.parametrize("ratio, warns", [(40.0, True), (0.2, False)])
def test_builder_warns_when_bfloat16_products_are_emulated(ratio, warns, monkeypatch, recwarn):
    """On a CPU without AMX / AVX512-BF16, bfloat16 products are emulated (about 40x slower
    than float32 on an AVX2 AMD EPYC): the builder says so, naming the option and the
    ratio; where they are faster it says nothing. The ratio is stubbed: no timing here."""
    seen = []

    def slowdown(dtype, device="cpu", size=256):
        seen.append(dtype)
        return ratio

    monkeypatch.setattr(B, "matmul_slowdown", slowdown)
    cfg = resolve_config(_cfg(matmul_dtype="bfloat16"), "online")
    env = B.make_environment(cfg, seed=0)
    try:
        B.make_loss_module(cfg, B.make_actor(cfg, env), B.make_critics(cfg, env), env.action_spec)
    finally:
        env.close()
    assert seen == [torch.bfloat16]
    msgs = [str(w.message) for w in recwarn if "network.matmul_dtype" in str(w.message)]
    if warns:
        assert len(msgs) == 1 and "40.0x as long as a float32 one" in msgs[0]
        assert "network.matmul_dtype=null" in msgs[0]
    else:
        assert msgs == []


def test_matmul_slowdown_measures_a_positive_ratio():
    from torchrl_spqr.modules.relu_mlp import matmul_slowdown

    threads = torch.get_num_threads()
    ratio = matmul_slowdown(torch.bfloat16, size=32)
    assert isinstance(ratio, float) and 0 < ratio < float("inf")
    assert matmul_slowdown(torch.bfloat16, size=32) == ratio  # measured once per process
    assert torch.get_num_threads() == threads  # measured on one thread, then restored


def test_open_run_folder_applies_the_malloc_setting(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(C, "retain_freed_memory", lambda: calls.append(1) or True)
    for flag in (True, False):
        cfg = resolve_config({**CFG, "retain_freed_memory": flag}, "online")
        C.open_run_folder(cfg, tmp_path / str(flag))
    assert calls == [1]  # once: only with the flag on


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retain_freed_memory_sets_glibcs_thresholds():
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except AttributeError:
        pytest.skip("not glibc")
    assert retain_freed_memory() is True
    # still a working allocator: large blocks freed and allocated again
    for _ in range(3):
        x = torch.empty(8 << 20, dtype=torch.uint8).fill_(1)
        assert int(x[-1]) == 1
        del x


@pytest.mark.parametrize(
    "kwargs", [{"trim_threshold": -1}, {"top_pad": 1.5}, {"mmap_threshold": True}]
)
def test_retain_freed_memory_refuses_bad_values(kwargs):
    with pytest.raises(ValueError, match="non-negative number of bytes"):
        retain_freed_memory(**kwargs)
