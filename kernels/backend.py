"""The one place that decides how a kernel runs.

Three backends:

* ``"triton"``    compiled Triton kernels, for CUDA tensors;
* ``"interpret"`` the same Triton kernels run by Triton's interpreter on CPU tensors
  (``TRITON_INTERPRET=1`` must be set before the kernel modules are imported; tests do it
  in ``tests/conftest.py``);
* ``"torch"``     the plain-torch implementation of the same math: the CPU fast path and the
  tests' oracle.

``auto`` (the default) picks ``triton`` for CUDA tensors and ``torch`` otherwise.  The
interpreter is never picked automatically: it is ~1000x slower than torch and only meant
for tests.  Force a backend with the environment variable ``FORGETLESS_BACKEND``
(``auto | triton | torch``; ``triton`` on CPU tensors means the interpreter, and needs
``TRITON_INTERPRET=1``) or, inside a process, with :func:`forced`.  Nothing else in the
project asks "is there a GPU?".

Precision is decided here too.  Every op's autograd Function asks :func:`compute_dtype` which
dtype its matmuls run in: the autocast dtype when autocast is on for the tensors' device
(CPU or CUDA alike), else the input's dtype.  The op then runs its own body under
:func:`autocast_off` and casts explicitly, so nothing inside is cast twice or behind its back,
and its backward (which autograd may run inside or outside the autocast region) does the
same math either way.  :func:`cpu_has_native_bf16` is what a ``bf16=auto`` setting asks on CPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

ENV_VAR = "FORGETLESS_BACKEND"
# Below this many parameters a model runs on ONE CPU thread (eval's scoring, the trainer):
# its matmuls take microseconds, and splitting them across threads costs more than it saves
# (measured on 2 busy cores: a decoding step 52 ms on 2 threads vs 5.7 ms on 1; a LoRA step of
# the tiny demo base 0.3 s vs 0.03 s). One number, so eval and the trainer agree.
SMALL_MODEL_PARAMS = 20_000_000
_CHOICES = ("auto", "triton", "torch")
_forced: str | None = None


def interpreter_enabled() -> bool:
    """True when Triton kernels were (or will be) decorated in interpreter mode."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def requested() -> str:
    """The backend asked for: :func:`forced` wins over the environment variable."""
    choice = _forced or os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {', '.join(_CHOICES)}")
    return choice


def select(*tensors: torch.Tensor) -> str:
    """Return ``"triton"``, ``"interpret"`` or ``"torch"`` for an op on ``tensors``."""
    choice = requested()
    on_cuda = any(t.is_cuda for t in tensors if t is not None)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    # choice == "triton": the caller insists on the Triton kernels.
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed (pip install triton)")
    if on_cuda:
        return "triton"
    if not interpreter_enabled():
        raise RuntimeError(
            f"{ENV_VAR}=triton on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing forgetless (or move the tensors to CUDA)"
        )
    return "interpret"


@contextlib.contextmanager
def forced(choice: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (tests, benchmarks)."""
    global _forced
    if choice not in _CHOICES:
        raise ValueError(f"backend {choice!r} is not one of {', '.join(_CHOICES)}")
    previous, _forced = _forced, choice
    try:
        yield
    finally:
        _forced = previous


# --------------------------------------------------------------------------- precision


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively: x86 with AVX512_BF16 or AMX-BF16.

    Detected from the ``flags`` lines of ``/proc/cpuinfo`` (Linux; the kernel lists
    ``avx512_bf16`` and ``amx_bf16`` there when the CPU has them).  Anywhere that file is
    missing or unreadable (macOS, Windows, containers hiding it) the answer is a safe False:
    without native support bf16 GEMMs are emulated and slower than fp32, so ``bf16=auto``
    must not turn it on.  Arm's BF16 extension is not counted (not measured here)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype an op's matmuls run in for ``tensor``: the autocast dtype when autocast is
    enabled for its device type (and the tensor is floating point), else its own dtype."""
    device_type = tensor.device.type
    if tensor.is_floating_point() and device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def autocast_off(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``tensor``'s device type: inside an op every cast is explicit."""
    device_type = tensor.device.type
    if device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
