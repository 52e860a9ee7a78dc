"""pytest-benchmark version of the LoRA layer benchmark (``pytest bench/ --benchmark-only``).

Not part of the default test run (``testpaths = tests``).  Same providers as
``python -m bench lora`` (ours / PEFT / nn.Linear), forward+backward, one mid-size shape;
``--benchmark-group-by=param:dropout`` lines them up.  The ``python -m bench`` harness is
the one that interleaves providers and writes the CSV; this is for pytest-benchmark users.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("kernels.lora_layers")

from bench.bench_lora import LayerShape, build_layers  # noqa: E402

SHAPE = LayerShape(tokens=512, in_features=512, out_features=1376, r=16)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("provider", ["ours", "peft", "nn.Linear"])
def test_lora_layer_full(benchmark, provider, dropout):
    layer = build_layers(SHAPE, dropout, torch.device("cpu"), torch.float32)[provider]
    x = torch.randn(SHAPE.tokens, SHAPE.in_features, requires_grad=True)
    dy = torch.randn(SHAPE.tokens, SHAPE.out_features)
    benchmark.group = f"lora_linear full {SHAPE.label} dropout={dropout}"

    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(dy)

    benchmark(step)
