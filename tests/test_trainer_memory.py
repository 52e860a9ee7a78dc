"""trainer.memory: a run's own peak memory, not the process's largest so far."""
from __future__ import annotations

import mmap

import pytest
import torch

from trainer.memory import peak_memory_mb, peak_memory_scope, reset_peak_memory

CPU = torch.device("cpu")


def test_peak_is_reset_between_runs_in_one_process():
    if not reset_peak_memory(CPU):
        pytest.skip("this kernel cannot reset the resident high-water mark (/proc/self/clear_refs)")
    # 300 MiB of fresh pages, each touched: resident until unmapped. (mmap itself rather than a
    # tensor: malloc may serve a tensor from heap pages an earlier test left resident.)
    size = 300 * 2**20
    big = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        big[offset] = 1
    with_big = peak_memory_mb(CPU)
    big.close()
    assert reset_peak_memory(CPU)
    after_reset = peak_memory_mb(CPU)
    # The hand count: the second window never held the 300 MiB the first one did.
    assert with_big - after_reset > 250
    assert peak_memory_scope(CPU, True) == "resident, this run"


def test_without_a_reset_the_summary_says_whole_process(monkeypatch, tmp_path):
    import trainer.memory as memory

    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    assert not memory.reset_peak_memory(CPU)
    assert memory.peak_memory_scope(CPU, False) == "resident, whole process"
    assert memory.peak_memory_mb(CPU) > 0
