"""The command line of the data layer: build, list and inspect local Minari datasets.

Build datasets locally (D4RL recipe on Gymnasium MuJoCo v5 envs, written as
Minari datasets with ``minari.create_dataset_from_buffers``; h5py is enough)::

    # uniform random actions
    python -m torchrl_spqr.data build --env Hopper-v5 --kind random --steps 5000 \\
        --id local/hopper/random-v0
    # roll out the deterministic actor of an online run (sota_scripts/sac_ens_spqr output)
    python -m torchrl_spqr.data build --env Hopper-v5 --kind medium --steps 1000000 \\
        --policy-run RUN_DIR --id local/hopper/medium-v0 --ref-max-score 3234.3
    python -m torchrl_spqr.data build --env Hopper-v5 --kind expert --steps 1000000 \\
        --policy-run EXPERT_RUN_DIR --id local/hopper/expert-v0
    # the replay buffer of the medium run / of the expert run (checkpoint/buffer)
    python -m torchrl_spqr.data build --kind medium-replay --source-run RUN_DIR \\
        --id local/hopper/medium-replay-v0 --ref-max-score 3234.3
    python -m torchrl_spqr.data build --kind full-replay --source-run EXPERT_RUN_DIR \\
        --id local/hopper/full-replay-v0
    # concatenation of two local datasets
    python -m torchrl_spqr.data build --kind medium-expert \\
        --parts local/hopper/medium-v0 local/hopper/expert-v0 --id local/hopper/medium-expert-v0

    python -m torchrl_spqr.data list          # local datasets, sizes, reference scores
    python -m torchrl_spqr.data info local/hopper/random-v0

The build options are :func:`~torchrl_spqr.data.builder.build_dataset`'s: ``--seed``,
``--max-episode-steps``, ``--noise`` (Gaussian exploration noise for policy rollouts),
``--expert-run`` (run whose actor sets ``ref_max_score``; the data source of
``full-replay``), ``--ref-episodes``, ``--ref-min-score``, ``--ref-max-score``,
``--overwrite``. Run folders are read by :class:`torchrl_spqr.training.restore.RunFolders`
(this entry point sits above the training layer; the data layer itself never imports it).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from torchrl_spqr.data.builder import build_dataset
from torchrl_spqr.data.errors import DatasetUnavailableError
from torchrl_spqr.data.runs import _own_error
from torchrl_spqr.data.scores import KINDS, _opt_float
from torchrl_spqr.data.store import (
    _check_dataset_id,
    _check_hdf5,
    _exists_locally,
    _minari_eval_env,
    _minari_metadata,
    _recover_interrupted_builds,
    minari_datasets_path,
)
from torchrl_spqr.training.restore import RunFolders

__all__ = ["main"]


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
        runs=RunFolders(),
    )
    meta = ds.storage.metadata
    print(
        f"built {args.id} at {minari_datasets_path() / args.id}: {meta['total_steps']} steps, "
        f"{meta['total_episodes']} episodes, ref_min_score={meta.get('ref_min_score')}, "
        f"ref_max_score={meta.get('ref_max_score')} in {time.perf_counter() - t0:.1f}s"
    )
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m torchrl_spqr.data") -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    ``prog`` is the command shown in the usage (the old ``torchrl_spqr.datasets`` passes
    its own). Input errors print ``error: ...`` and return 2; Ctrl-C returns 130.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
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
