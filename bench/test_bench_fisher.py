"""pytest-benchmark version of the Fisher layer benchmark (``pytest bench/ --benchmark-only``).

The weight-gradient op given x and dy: ours (``linear_grad_and_fisher``), the plain weight
gradient, BackPACK's ``SumGradSquared`` rule on the same x and dy (with and without the weight
gradient beside it), the per-sample loop, the materialised per-sample gradients, Avalanche's
squared minibatch gradient; and BackPACK's whole extended layer (forward + backward) next to
ours doing the same forward + backward.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("kernels.fisher")

from bench.bench_fisher import backward_providers, full_providers  # noqa: E402

N, T, IN, OUT = 8, 64, 512, 1376


@pytest.fixture(scope="module")
def tensors():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, T, IN, generator=gen)
    dy = torch.randn(N, T, OUT, generator=gen)
    weight = torch.randn(OUT, IN, generator=gen) * 0.02
    return x, dy, weight


def _run(benchmark, provider):
    def call():
        state = provider.setup() if provider.setup else None
        return provider.run(state)

    benchmark(call)


@pytest.mark.parametrize("name", ["ours", "weight_grad", "backpack_sgs", "backpack_sgs_only", "per_sample_loop",
                                  "materialised", "sq_minibatch_grad"])
def test_fisher_weight_grad_op(benchmark, tensors, name):
    x, dy, _ = tensors
    benchmark.group = f"fisher_linear backward N{N} T{T} {IN}->{OUT}"
    _run(benchmark, {p.name: p for p in backward_providers(x, dy)}[name])


@pytest.mark.parametrize("name", ["ours", "nn.Linear", "backpack", "opacus"])
def test_fisher_layer_full(benchmark, tensors, name):
    pytest.importorskip("backpack")
    pytest.importorskip("opacus")
    x, dy, weight = tensors
    benchmark.group = f"fisher_linear full N{N} T{T} {IN}->{OUT}"
    _run(benchmark, {p.name: p for p in full_providers(weight, x, dy)}[name])
