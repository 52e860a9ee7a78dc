"""Test setup shared by every test file.

TRITON_INTERPRET is read when each ``@triton.jit`` decorator runs, i.e. when a kernel
module is imported, so it is set here, before anything imports the project, and only when
there is no CUDA device (on a GPU the same tests run the compiled kernels).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests must not reach the network: tiny models are built from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """CUDA when present (kernels compiled), else CPU (interpreter / torch path)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread. Tiny models train ~10-30x faster that way on a busy
    2-core machine than on two threads waiting on each other (measured while building this)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
