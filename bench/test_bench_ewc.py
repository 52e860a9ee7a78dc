"""pytest-benchmark version of the EWC benchmark (``pytest bench/ --benchmark-only``):
the fused ``ewc_step`` against the autograd penalty and an in-place loop, over all parameters
of a small Llama (the ``python -m bench ewc`` run uses the 4-layer, 512-wide one)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("kernels.ewc")

from bench.bench_ewc import providers  # noqa: E402
from bench.bench_lora import StepShape, build_llama  # noqa: E402


@pytest.fixture(scope="module")
def state():
    model = build_llama(StepShape(layers=2, hidden=256, intermediate=688, heads=4, vocab=2048, batch=1, seq=8, r=0),
                        torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    anchors = [p.detach() + 0.01 * torch.randn(p.shape, generator=gen) for p in params]
    fishers = [torch.rand(p.shape, generator=gen) for p in params]
    return params, anchors, fishers


@pytest.mark.parametrize("name", ["ours", "autograd", "inplace_loop"])
def test_ewc_step(benchmark, state, name):
    provider = {p.name: p for p in providers(*state)}[name]
    benchmark.group = "ewc_step"

    def call():
        provider.setup()
        return provider.run(None)

    benchmark(call)
