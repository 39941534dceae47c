"""Run TorchRL's unmodified SAC SOTA script with ``logger.backend=csv``.

    python torchrl_sac_csv.py SAC_DIR [hydra overrides...]

``SAC_DIR`` holds TorchRL's ``sota-implementations/sac/{sac.py,utils.py,config.yaml}``
as they are. The script logs ``train/reward`` (the returns of every episode that
ended in the batch) as a tensor; TorchRL's logger turns a tensor with more than
one element into a list and ``CSVExperiment.add_scalar`` then fails on
``float(list)`` (TypeError) as soon as two episodes end in one batch. This
launcher makes the CSV logger write the mean of such a list instead and runs
``sac.py`` unchanged; every other logged value (``eval/reward`` included) is a
single number and is written as TorchRL writes it.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from torchrl.record.loggers import csv as trl_csv


def _flatten(value: object) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    return [float(value)]


_add_scalar = trl_csv.CSVExperiment.add_scalar


def _add_scalar_mean(self, name: str, value: object, global_step: int | None = None) -> None:
    if isinstance(value, (list, tuple)):
        flat = _flatten(value)
        value = sum(flat) / len(flat)
    _add_scalar(self, name, value, global_step=global_step)


def main() -> None:
    if len(sys.argv) < 2 or not (Path(sys.argv[1]) / "sac.py").is_file():
        sys.exit("usage: python torchrl_sac_csv.py SAC_DIR [overrides...]; SAC_DIR holds sac.py")
    sac_dir = Path(sys.argv[1]).resolve()
    trl_csv.CSVExperiment.add_scalar = _add_scalar_mean
    sys.path.insert(0, str(sac_dir))  # sac.py imports its utils.py
    sys.argv = [str(sac_dir / "sac.py"), *sys.argv[2:]]
    runpy.run_path(str(sac_dir / "sac.py"), run_name="__main__")


if __name__ == "__main__":
    main()
