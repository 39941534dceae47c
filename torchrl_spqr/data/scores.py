"""D4RL's reference scores: the normalised score, its reference tables and dataset ids.

D4RL's Gym-MuJoCo splits (:data:`KINDS`), the reference returns of each environment family
(:data:`D4RL_REF_SCORES`), the Gymnasium environment that reproduces each family's data
(:data:`D4RL_ENV_IDS`), the parser of D4RL ids and :func:`normalized_score`. Reference
scores recorded in a dataset's metadata are read (and checked) by :func:`_ref_scores`.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = [
    "D4RL_ENV_IDS",
    "D4RL_REF_SCORES",
    "KINDS",
    "d4rl_env_id",
    "d4rl_env_kwargs",
    "d4rl_ref_scores",
    "normalized_score",
    "parse_d4rl_id",
]

#: Dataset recipes understood by :func:`~torchrl_spqr.data.builder.build_dataset` (D4RL's
#: Gym-MuJoCo splits).
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
#: Checked by ``tests/training/test_fidelity_envs_init.py`` (friction read from the simulator).
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
    """``gymnasium.make`` kwargs of that env (``ant-*`` -> ``use_contact_forces=True``)."""
    return dict(D4RL_ENV_IDS[parse_d4rl_id(dataset_id)[0]][1])


def d4rl_ref_scores(dataset_id: str) -> tuple[float, float]:
    """D4RL's published ``(REF_MIN_SCORE, REF_MAX_SCORE)`` for a D4RL id."""
    return D4RL_REF_SCORES[parse_d4rl_id(dataset_id)[0]]


def _family_of_env(env_id: str) -> str | None:
    name = env_id.split("-")[0].lower()
    return name if name in D4RL_REF_SCORES else None


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
                "give --ref-min-score / --ref-max-score (python -m torchrl_spqr.data "
                "build ... --overwrite)."
            )
        out.append(v)
    lo, hi = out
    if lo is not None and hi is not None and not hi > lo:
        raise ValueError(
            f"Dataset {dataset_id!r} records ref_min_score={lo} and ref_max_score={hi}: "
            "normalised scores need ref_max_score > ref_min_score. Rebuild it with "
            "--ref-min-score / --ref-max-score (python -m torchrl_spqr.data build ... "
            "--overwrite)."
        )
    return lo, hi


def _opt_float(x) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
