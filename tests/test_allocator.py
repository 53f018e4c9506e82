"""``retained_heap``: freed memory is reused inside the block and handed back after it."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys

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


_AFTER_THE_BLOCK = """
import resource, statistics, sys, torch
from heta_fast.allocator import retained_heap

def faults(mib):
    counts = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(mib << 18).fill_(1.0)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(counts)

with retained_heap():
    pass
print(faults(16), faults(48))
"""


@glibc
def test_what_it_leaves_after_the_block_is_what_the_readme_says():
    """glibc cannot switch its dynamic thresholds back on: they stay fixed at their ceilings (README).

    In a fresh process (in this one, heap memory kept by earlier tests can serve any size without
    a fault): a freed 16 MiB block is reused from the heap (below the 32 MiB mmap threshold and
    the 64 MiB trim threshold left in place), a 48 MiB one is mmap'd afresh every time.
    """
    out = subprocess.run([sys.executable, "-c", _AFTER_THE_BLOCK], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    below, above = (float(x) for x in out.stdout.split())
    page = resource.getpagesize()
    assert below < (16 << 20) // page / 100  # heap, reused
    assert above > (48 << 20) // page / 2  # mmap'd afresh
