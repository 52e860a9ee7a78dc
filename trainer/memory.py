"""Peak memory of one training run, also when several runs share a process.

CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``), reset when a run
starts. CPU (Linux): the process's resident-set high-water mark ``VmHWM`` from
``/proc/self/status``, reset when a run starts by writing ``5`` to ``/proc/self/clear_refs``
(Linux 4.0+). ``ru_maxrss`` alone cannot be reset: in ``trainer.demo.compare`` or
``trainer.sequence``, which run many trainings in one process, it would report the largest
run so far for every later one. Where the reset is not possible the value is the process's
high-water mark, and :func:`peak_memory_scope` says so.
"""
from __future__ import annotations

import resource
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new high-water mark; False where this platform cannot (the process's peak stays)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_memory_mb(device: torch.device) -> float:
    """MiB: CUDA's allocated peak, or the CPU process's resident high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_scope(device: torch.device, reset: bool) -> str:
    """What the number covers, for the run summary."""
    if device.type == "cuda":
        return "allocated, this run"
    return "resident, this run" if reset else "resident, whole process"
