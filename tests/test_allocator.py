"""``retained_heap``: freed memory is reused inside the block and handed back after it."""

from __future__ import annotations

import resource
import statistics

import pytest
import torch

from heta_fast.allocator import _glibc, retained_heap

glibc = pytest.mark.skipif(_glibc() is None, reason="needs glibc (mallopt)")


def faults_per_allocation(repeats: int = 5, mib: int = 96) -> float:
    """Median minor page faults of filling a fresh ``mib`` MiB tensor (above glibc's mmap ceiling).

    The median skips a one-off growth of the heap, which depends on what the process mapped before.
    """
    counts = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(mib << 18).fill_(1.0)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(counts)


def assert_restored() -> None:
    """Freed memory is given back again: a block larger than any freed inside faults in afresh each time.

    (A block the size of those freed inside may still be served from memory glibc could not hand
    back, e.g. a heap top away from the program break, so the check uses a larger one.)
    """
    assert faults_per_allocation(mib=384) > (384 << 20) // resource.getpagesize() / 2


@glibc
def test_freed_memory_is_reused_inside_and_released_after():
    pages = (96 << 20) // resource.getpagesize()
    assert faults_per_allocation() > pages / 2  # mmap'd afresh every time
    with retained_heap() as applied:
        assert applied
        assert faults_per_allocation() < pages / 100
    assert_restored()


@glibc
def test_nested_blocks_restore_once_at_the_outermost_exit():
    pages = (96 << 20) // resource.getpagesize()
    with retained_heap():
        with retained_heap():
            pass
        assert faults_per_allocation() < pages / 100
    assert_restored()


def test_disabled_is_a_no_op():
    with retained_heap(enabled=False) as applied:
        assert applied is False
    with retained_heap(device=torch.device("cuda", 0)) as applied:  # the host heap is not the GPU's
        assert applied is False


@glibc
def test_what_it_leaves_after_the_block_is_what_the_readme_says():
    """glibc cannot switch its dynamic thresholds back on: they stay fixed at their ceilings (README)."""
    with retained_heap():
        pass
    below, above = 16, 48  # MiB, either side of the 32 MiB mmap threshold left in place
    assert faults_per_allocation(mib=below) < (below << 20) // resource.getpagesize() / 100  # heap, reused
    assert faults_per_allocation(mib=above) > (above << 20) // resource.getpagesize() / 2  # mmap'd afresh
