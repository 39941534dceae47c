"""The scripts' structured configs: one schema per script, resolve_config's names, types, defaults."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra")
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.errors import ConfigCompositionException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from torchrl_spqr.training.config import (  # noqa: E402
    FAMILIES,
    SCHEMAS,
    ConfigError,
    resolve_config,
    schema_name,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"sac_n", "edac", "cql"}


def _compose(algo: str, *overrides: str):
    extra = ["dataset=local_hopper_random"] if algo in OFFLINE else []
    folder = ROOT / "sota_scripts" / f"{algo}_spqr"
    with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        return compose(config_name="config", overrides=[*extra, *overrides])


def _online(**sections):
    return {"algorithm": "redq", "env": {"name": "Pendulum-v1"}, **sections}


def test_every_script_names_its_schema_and_composes_onto_it():
    for algo in SCHEMAS:
        text = (ROOT / "sota_scripts" / f"{algo}_spqr" / "config.yaml").read_text()
        assert f"- {schema_name(algo)}" in text, algo
        assert ConfigStore.instance().repo[f"{schema_name(algo)}.yaml"] is not None
        cfg = resolve_config(_compose(algo), "any")
        assert cfg.algorithm == algo


@pytest.mark.parametrize("algo", sorted(SCHEMAS))
def test_config_yaml_values_are_the_schema_defaults(algo):
    """config.yaml documents each setting with its source; the schema holds the same value."""
    raw = OmegaConf.load(ROOT / "sota_scripts" / f"{algo}_spqr" / "config.yaml")
    raw = OmegaConf.to_container(
        OmegaConf.masked_copy(raw, [k for k in raw if k not in ("defaults", "hydra")]),
        resolve=True,
    )
    defaults = dataclasses.asdict(SCHEMAS[algo]())

    def walk(node, ref, path=""):
        for key, value in node.items():
            assert key in ref, f"{path}{key} is not in the schema"
            if isinstance(value, dict):
                walk(value, ref[key], f"{path}{key}.")
            else:
                assert ref[key] == value, f"{path}{key}: schema {ref[key]!r}, yaml {value!r}"

    walk(raw, defaults)


def test_defaults_come_from_the_schema():
    cfg = resolve_config(_online(), "online")
    assert cfg.optim.utd_ratio == 20 and cfg.optim.policy_update_delay == 20
    assert cfg.network.sub_sample_len == 2 and cfg.network.init == "redq"
    assert cfg.optim.actor_lr is None  # null: optim.lr
    assert cfg.collector.ray.cpus_per_worker == 1.0 and cfg.logger.wandb_mode == "offline"
    sac = resolve_config({"algorithm": "sac_ens", "env": {"name": "Pendulum-v1"}}, "online")
    assert sac.optim.utd_ratio == 1 and "sub_sample_len" not in sac.network
    cql = resolve_config({"algorithm": "cql", "dataset": {"id": "x/y-v0"}}, "offline")
    assert cql.optim.bc_steps == 40_000 and cql.spqr.beta == 2.0 and cql.network.ensemble_size == 6
    # a group given in part takes the rest from its script's defaults, not the group class's
    part = {"algorithm": "sac_ens", "env": {"name": "Pendulum-v1"}, "network": {"ensemble_size": 3}}
    net = resolve_config(part, "online").network
    assert (
        net.ensemble_size == 3 and net.init == "redq" and list(net.actor_log_std_clamp) == [-20, 2]
    )
    net = resolve_config(
        {"algorithm": "cql", "network": {"dropout": 0.1}}, "cql", check=False
    ).network
    assert net.ensemble_size == 6 and list(net.hidden_sizes) == [256, 256, 256]


def test_values_are_converted_to_the_field_type():
    cfg = resolve_config(
        _online(optim={"lr": "1e-3", "batch_size": 64.0, "utd_ratio": "4"}, logger={"progress": "false"}),
        "online",
    )  # fmt: skip
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.batch_size == 64 and isinstance(cfg.optim.batch_size, int)
    assert cfg.optim.utd_ratio == 4 and cfg.logger.progress is False
    gamma = resolve_config(_online(optim={"gamma": 1}), "online").optim.gamma
    assert gamma == 1.0 and isinstance(gamma, float)


def test_null_gives_the_default_unless_the_field_allows_null():
    cfg = resolve_config(
        _online(optim={"gamma": None}, network={"actor_log_std_clamp": None}), "online"
    )
    assert cfg.optim.gamma == 0.99  # not nullable: its default
    assert cfg.network.actor_log_std_clamp is None  # nullable: kept (TorchRL's softplus scale)


@pytest.mark.parametrize(
    "sections,shown",
    [
        ({"optim": {"lr": "abc"}}, "optim.lr='abc': expected a float, got a string"),
        ({"optim": {"batch_size": 2.5}}, "optim.batch_size=2.5: expected an integer"),
        ({"resume": "maybe"}, "resume='maybe': expected true or false"),
        ({"seed": True}, "seed=true: expected an integer, got true / false"),
        ({"network": {"hidden_sizes": [16, "a"]}}, "network.hidden_sizes=[16, 'a']: expected a list of integers"),
        ({"network": {"hidden_sizes": 16}}, "network.hidden_sizes=16: expected a list of integers"),
        ({"env": {"name": 3}}, "env.name=3: expected a string"),
        ({"spqr": 1.0}, "spqr=1.0: expected a group of fields"),
    ],
)  # fmt: skip
def test_wrong_type_names_the_field_and_the_type(sections, shown):
    with pytest.raises(ConfigError) as err:
        resolve_config({**_online(), **sections}, "online")
    assert shown in str(err.value) and "set it" in str(err.value), err.value


@pytest.mark.parametrize(
    "sections,field,hint",
    [
        ({"spqr": {"bta": 1.0}}, "spqr.bta", "spqr.beta"),
        ({"optim": {"learning_rate": 1e-3}}, "optim.learning_rate", None),
        ({"colector": {}}, "colector", "collector"),
        ({"optim": {"eta": 1.0}}, "optim.eta", None),  # EDAC's field, not REDQ's
    ],
)
def test_unknown_field_is_refused_by_name(sections, field, hint):
    with pytest.raises(ConfigError) as err:
        resolve_config({**_online(), **sections}, "online")
    msg = str(err.value)
    assert msg.startswith(f"{field}: unknown field"), msg
    assert hint is None or f"did you mean {hint}" in msg, msg


def test_range_checks_still_run():
    with pytest.raises(ConfigError, match=r"spqr\.beta=-1"):
        resolve_config(_online(spqr={"beta": -1}), "online")
    with pytest.raises(ConfigError, match=r"network\.sub_sample_len=11"):
        resolve_config(_online(network={"sub_sample_len": 11}), "online")
    resolve_config(_online(spqr={"beta": 0}), "online", check=False)  # fine either way
    cfg = resolve_config(_online(optim={"tau": 2.0}), "online", check=False)
    assert cfg.optim.tau == 2.0  # check=False: names, types and defaults only
    with pytest.raises(ConfigError, match=r"optim\.tau"):
        validate_config(_online(optim={"tau": 2.0}))


def test_kind_selects_the_algorithms_it_runs():
    masac = resolve_config(_compose("masac"), "multiagent")
    assert masac.env.scenario_name == "balance"
    with pytest.raises(ConfigError, match=r"algorithm='masac': expected one of redq, sac_ens"):
        resolve_config(_compose("masac"), "online")
    with pytest.raises(ConfigError, match=r"algorithm='redq'"):
        resolve_config(_online(), "offline")
    with pytest.raises(ConfigError, match=r"algorithm='sac_n': this config is checked as 'redq'"):
        resolve_config({"algorithm": "sac_n"}, "redq")
    with pytest.raises(ValueError, match="kind='ppo'"):
        resolve_config(_online(), "ppo")
    assert set(FAMILIES["any"]) == set(SCHEMAS)


def test_resolved_config_is_read_by_attribute_and_refuses_typos():
    cfg = resolve_config(_compose("sac_ens", "env=pendulum"), "online")
    assert cfg.env.name == "Pendulum-v1" and cfg.optim.lr == pytest.approx(3e-4)
    with pytest.raises(AttributeError):
        cfg.optim.learning_rate  # noqa: B018
    assert resolve_config(cfg, "online") == cfg  # resolving twice changes nothing


def test_hydra_refuses_a_misspelt_field_by_name():
    with pytest.raises(ConfigCompositionException, match="bta"):
        _compose("sac_ens", "spqr.bta=1")
    # '+' adds a key past Hydra's check; resolve_config still refuses it by name
    with pytest.raises(ConfigError, match=r"spqr\.bta: unknown field.*did you mean spqr\.beta"):
        resolve_config(_compose("sac_ens", "+spqr.bta=1"), "online")


def test_hydra_keeps_wrong_types_for_resolve_config():
    """The registered nodes type every leaf Any: a wrong type reaches the one-line ConfigError."""
    cfg = _compose("redq", "optim.lr=abc")
    assert cfg.optim.lr == "abc"
    with pytest.raises(ConfigError, match=r"optim\.lr='abc': expected a float"):
        resolve_config(cfg, "online")


def test_script_refuses_a_misspelt_override(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sota_scripts/redq_spqr/redq_spqr.py"), "optim.lr_typo=1",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "optim.lr_typo" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.csv").exists()
