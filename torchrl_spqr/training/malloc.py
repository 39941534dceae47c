"""Keep freed memory in the process: glibc ``malloc`` settings for CPU training.

An SAC-Ens update on the CPU allocates and frees tens of activation tensors of a
few MB each (``[N, B, 256]`` float32: 2.6 MB at ``N = 10``, ``B = 256``). With
glibc's defaults, blocks above the (dynamic) ``mmap`` threshold come from
``mmap`` and go back with ``munmap``, and free memory at the top of the heap
above the trim threshold is returned with ``sbrk``: the next update's tensors
then land on fresh pages, and every first touch of a 4 KiB page is a page
fault. :func:`retain_freed_memory` raises those thresholds with ``mallopt`` so
freed blocks are reused instead, the effect jemalloc or tcmalloc have when
preloaded (``LD_PRELOAD``), without a library to install.
``benchmarks/bench_population.py`` measures it side by side (one process with
these settings, one without): ``benchmarks/README.md``, section 10.

The cost is memory the process keeps after its peak: what it freed stays
reserved for reuse (up to ``trim_threshold`` at the top of the heap), so the
resident size stays near the peak instead of shrinking between updates. Blocks
larger than ``mmap_threshold`` (32 MiB, glibc's upper limit) still use
``mmap``. Only glibc (Linux) has ``mallopt``; elsewhere this does nothing and
returns ``False``.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["retain_freed_memory"]

# mallopt parameters, <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_MIB = 1 << 20


def retain_freed_memory(
    *,
    trim_threshold: int = 1024 * _MIB,
    mmap_threshold: int = 32 * _MIB,
    top_pad: int = 64 * _MIB,
) -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse; ``True`` if it applied.

    Args:
        trim_threshold: free memory at the top of the heap kept before any is
            returned to the system (``M_TRIM_THRESHOLD``).
        mmap_threshold: requests at least this large use ``mmap``
            (``M_MMAP_THRESHOLD``; glibc accepts at most 32 MiB on 64-bit
            systems). Fixing it also stops glibc's dynamic adjustment.
        top_pad: extra memory requested from the system with each heap
            extension (``M_TOP_PAD``).

    Call it once, early (later allocations follow it; memory already freed is
    not affected). Returns ``False`` without changing anything where ``malloc``
    is not glibc's (macOS, Windows, musl) and raises ``ValueError`` if glibc
    refuses a value.

    Examples:
        >>> from torchrl_spqr.training.malloc import retain_freed_memory
        >>> retain_freed_memory() in (True, False)
        True
    """
    for name, value in (
        ("trim_threshold", trim_threshold),
        ("mmap_threshold", mmap_threshold),
        ("top_pad", top_pad),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative number of bytes, got {value!r}.")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such symbol)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    for param, name, value in (
        (_M_MMAP_THRESHOLD, "mmap_threshold", mmap_threshold),
        (_M_TRIM_THRESHOLD, "trim_threshold", trim_threshold),
        (_M_TOP_PAD, "top_pad", top_pad),
    ):
        if value >= 1 << 31 or mallopt(param, value) != 1:
            raise ValueError(f"glibc's mallopt refused {name}={value}.")
    return True
