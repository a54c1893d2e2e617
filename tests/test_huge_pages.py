"""model/huge_pages.py: a sharded model's large CPU tensors backed by 2 MB pages, values kept."""

from __future__ import annotations

import torch
from torch import nn

from morec_dist.model.huge_pages import (
    HUGE_PAGE,
    MIN_BYTES,
    back_with_huge_pages,
    huge_page_ranges,
    large_cpu_storages,
)


def huge_page_bytes() -> int:
    """This process's anonymous memory in huge pages (/proc/self/smaps_rollup)."""
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def test_only_whole_huge_pages_inside_the_tensor_are_named():
    assert huge_page_ranges(HUGE_PAGE, 3 * HUGE_PAGE) == (HUGE_PAGE, 3 * HUGE_PAGE)
    assert huge_page_ranges(HUGE_PAGE + 1, 3 * HUGE_PAGE) == (2 * HUGE_PAGE, 2 * HUGE_PAGE)
    assert huge_page_ranges(HUGE_PAGE + 1, HUGE_PAGE) is None  # straddles a boundary: no whole page


def test_large_storages_are_listed_once_and_small_ones_not():
    m = nn.Module()
    m.table = nn.Parameter(torch.zeros(MIN_BYTES // 4))
    m.register_buffer("view", m.table.data[: MIN_BYTES // 8])  # the same storage
    m.small = nn.Parameter(torch.zeros(1000))
    assert [n for _, n in large_cpu_storages(m)] == [MIN_BYTES]


def test_the_tables_end_in_huge_pages_with_their_values():
    m = nn.Module()
    m.table = nn.Parameter(torch.randn(4 * MIN_BYTES // 4, generator=torch.Generator().manual_seed(0)))
    values = m.table.detach().clone()
    before = huge_page_bytes()
    result = back_with_huge_pages(m)
    assert torch.equal(m.table.detach(), values)  # a collapse copies the pages: nothing changes
    assert result.advised_bytes >= 3 * MIN_BYTES
    # this machine's kernel (6.x, THP "madvise") collapses; a kernel without THP reports errors
    assert result.collapsed_bytes + result.errors * HUGE_PAGE > 0
    if result.collapsed_bytes:
        assert huge_page_bytes() - before >= result.collapsed_bytes // 2  # others may have been split since
