"""Transparent huge pages for a sharded model's large CPU tensors (``model.huge_pages``).

Embedding lookups and the fused optimizer touch random rows of multi-GB tables; with 4 KB
pages nearly every one misses the TLB, so a step slows as the tables grow. After the shards
are allocated and initialised, ``back_with_huge_pages`` asks the kernel to back each CPU
parameter or buffer of at least ``MIN_BYTES`` with 2 MB pages: ``MADV_HUGEPAGE`` (later
faults and khugepaged) and ``MADV_COLLAPSE`` (Linux >= 6.1: now, synchronously, whatever the
sysfs THP mode). Only these tensors: a process-wide switch (PyTorch's
``THP_MEM_ALLOC_ENABLE``) also gave huge pages to every step's temporaries, whose fresh
2 MB faults cost more than the tables gained at 1 GB (benchmarks/embedding_scale.py).

Best effort: a kernel without THP or ``MADV_COLLAPSE``, or a memory cgroup without room for
the copy, leaves the pages as they were; the result counts what was collapsed.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

from torch import nn

HUGE_PAGE = 2 << 20
MIN_BYTES = 16 * HUGE_PAGE  # smaller tensors gain little and would round up to 2 MB pages
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


@dataclass
class HugePages:
    """What ``back_with_huge_pages`` did: bytes asked for, and bytes now in huge pages."""

    advised_bytes: int = 0
    collapsed_bytes: int = 0
    errors: int = 0  # ranges the kernel refused (no THP, no MADV_COLLAPSE, no memory)


def huge_page_ranges(ptr: int, nbytes: int) -> tuple[int, int] | None:
    """The whole 2 MB pages inside [ptr, ptr + nbytes), as (start, length), or None."""
    start = -(-ptr // HUGE_PAGE) * HUGE_PAGE
    end = (ptr + nbytes) // HUGE_PAGE * HUGE_PAGE
    return (start, end - start) if end - start >= HUGE_PAGE else None


def large_cpu_storages(module: nn.Module, min_bytes: int = MIN_BYTES) -> list[tuple[int, int]]:
    """(address, bytes) of each distinct CPU storage of ``module``'s parameters and buffers
    holding at least ``min_bytes`` (a fused table group's weights and optimizer state)."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type != "cpu" or tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() >= min_bytes:
            seen[storage.data_ptr()] = storage.nbytes()
    return sorted(seen.items())


def back_with_huge_pages(module: nn.Module, min_bytes: int = MIN_BYTES) -> HugePages:
    """Ask for 2 MB pages under ``module``'s large CPU tensors (see the module's docstring)."""
    result = HugePages()
    if not sys.platform.startswith("linux"):
        return result
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for ptr, nbytes in large_cpu_storages(module, min_bytes):
        span = huge_page_ranges(ptr, nbytes)
        if span is None:
            continue
        start, length = span
        result.advised_bytes += length
        if libc.madvise(start, length, MADV_HUGEPAGE) != 0:
            result.errors += 1
            continue
        if libc.madvise(start, length, MADV_COLLAPSE) == 0:
            result.collapsed_bytes += length
        else:
            result.errors += 1
    return result
