"""The data layer's errors: a dataset that is not on this machine, a dataset that is damaged."""

from __future__ import annotations

__all__ = ["DatasetCorruptedError", "DatasetUnavailableError"]


class DatasetUnavailableError(RuntimeError):
    """The dataset is neither on this machine nor downloadable; the message says what to do."""


class DatasetCorruptedError(ValueError):
    """A local dataset's files cannot be read (truncated / garbage HDF5, broken metadata).

    The message names the file, the low-level error and how to replace the dataset.
    """


def _unavailable(dataset_id: str, tried: list[str], how: list[str]) -> DatasetUnavailableError:
    lines = [f"Offline dataset {dataset_id!r} is not available on this machine.", "Tried:"]
    lines += [f"  {i + 1}. {t}" for i, t in enumerate(tried)]
    lines.append("To provide the data locally:")
    lines += [f"  - {h}" for h in how]
    return DatasetUnavailableError("\n".join(lines))
