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
"""
from __future__ import annotations

import contextlib
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
