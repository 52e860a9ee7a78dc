"""LoRA: the fused layer against PEFT's LoRA layer and a plain ``nn.Linear``, and the
issue-2 training step (r=16 on every linear of a 4-layer, 512-wide Llama, AdamW) against PEFT.

Providers (kernel ``lora_linear``):

* ``ours``      ``kernels.LoRALinear`` (one ``lora_linear`` call: torch path on CPU, Triton on CUDA);
* ``peft``      PEFT's ``lora.Linear`` built by ``get_peft_model`` around the same base layer;
* ``nn.Linear`` the full fine-tuning layer: same base matmul, the weight gradient instead of
  the low-rank one (what LoRA is supposed to save).

Kernel ``lora_step``: one optimizer step (forward, loss, backward, AdamW, zero_grad) of the
whole model, ``ours`` = ``apply_lora`` vs ``peft`` = ``get_peft_model(target_modules="all-linear")``;
the same initial weights, the same batch, train mode (dropout active).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from bench.harness import (
    BenchContext,
    Provider,
    Quantiles,
    Target,
    measure,
    peak_memory_mib,
    time_interleaved,
)

KERNEL_LAYER = "lora_linear"
KERNEL_STEP = "lora_step"
LORA_ALPHA_PER_R = 2  # alpha = 2r, the usual recipe; the scale does not change the cost
DROPOUTS = (0.0, 0.05)

TARGETS = [
    Target("issue 2: LoRA step tokens/s >= 1.0x PEFT, dropout 0", KERNEL_STEP, "throughput", "peft",
           config_contains="dropout=0.0 ", min_ratio=1.0),
    Target("issue 2: LoRA step tokens/s >= 1.0x PEFT, dropout 0.05", KERNEL_STEP, "throughput", "peft",
           config_contains="dropout=0.05 ", min_ratio=1.0),
    Target("issue 2: LoRA step peak memory < PEFT, dropout 0.05", KERNEL_STEP, "memory", "peft",
           config_contains="dropout=0.05 ", max_ratio=0.999999),
]


@dataclass
class LayerShape:
    tokens: int
    in_features: int
    out_features: int
    r: int

    @property
    def label(self) -> str:
        return f"{self.in_features}x{self.out_features}r{self.r}"


def layer_shapes(ctx: BenchContext) -> list[LayerShape]:
    if ctx.quick:
        return [LayerShape(64, 48, 80, 4)]
    if ctx.device.type == "cuda":
        # Llama-8B-like projections over 8192 tokens.
        return [LayerShape(8192, 4096, 4096, 16), LayerShape(8192, 4096, 14336, 16),
                LayerShape(8192, 14336, 4096, 16), LayerShape(8192, 4096, 4096, 64)]
    # The 512-wide Llama of the step target, batch 8x256.
    return [LayerShape(2048, 512, 512, 16), LayerShape(2048, 512, 1376, 16),
            LayerShape(2048, 1376, 512, 16), LayerShape(2048, 512, 1376, 64)]


def bench_dtype(ctx: BenchContext) -> torch.dtype:
    return torch.bfloat16 if ctx.device.type == "cuda" and not ctx.quick else torch.float32


class _OneLinear(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.proj = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _randomise_lora(A: torch.Tensor, B: torch.Tensor, seed: int) -> None:
    # B starts at zero in both libraries; random B makes every product non-trivial.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        A.copy_(torch.randn(A.shape, generator=gen) * 0.02)
        B.copy_(torch.randn(B.shape, generator=gen) * 0.02)


def build_layers(shape: LayerShape, dropout: float, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The three layers over one shared base weight (cloned so none aliases another)."""
    from peft import LoraConfig, get_peft_model

    from kernels.lora_layers import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(shape.in_features, shape.out_features, bias=True).to(device=device, dtype=dtype)
    alpha = LORA_ALPHA_PER_R * shape.r
    ours = LoRALinear(copy.deepcopy(base), r=shape.r, alpha=alpha, dropout=dropout)
    _randomise_lora(ours.lora_A, ours.lora_B, 1)
    peft_model = get_peft_model(_OneLinear(copy.deepcopy(base)),
                                LoraConfig(r=shape.r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"]))
    peft_layer = peft_model.base_model.model.proj
    _randomise_lora(peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight, 1)
    full = copy.deepcopy(base)
    full.weight.requires_grad_(True)
    full.bias.requires_grad_(True)
    layers = {"ours": ours, "peft": peft_layer, "nn.Linear": full}
    for layer in layers.values():
        layer.train()
    return layers


def _zero_grads(layer: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def layer_providers(layers: dict[str, nn.Module], x: torch.Tensor, dy: torch.Tensor, mode: str) -> list[Provider]:
    providers = []
    for name, layer in layers.items():
        def clear(layer=layer):
            _zero_grads(layer, x)

        if mode == "forward":
            providers.append(Provider(name, run=lambda _s, layer=layer: layer(x), setup=clear))
        elif mode == "backward":
            def fwd(layer=layer):
                _zero_grads(layer, x)
                return layer(x)

            providers.append(Provider(name, run=lambda y: y.backward(dy), setup=fwd))
        else:  # full
            providers.append(Provider(name, run=lambda _s, layer=layer: layer(x).backward(dy), setup=clear))
    return providers


def bench_layers(ctx: BenchContext) -> None:
    dtype = bench_dtype(ctx)
    for dropout in DROPOUTS:
        for shape in layer_shapes(ctx):
            layers = build_layers(shape, dropout, ctx.device, dtype)
            gen = torch.Generator().manual_seed(2)
            x = torch.randn(shape.tokens, shape.in_features, generator=gen).to(ctx.device, dtype).requires_grad_(True)
            dy = torch.randn(shape.tokens, shape.out_features, generator=gen).to(ctx.device, dtype)
            config = f"M={shape.tokens} dropout={dropout} dtype={str(dtype).removeprefix('torch.')} "
            for mode in ("forward", "backward", "full"):
                print(f"  {KERNEL_LAYER} {mode} {shape.label} dropout={dropout}", flush=True)
                measure(ctx, KERNEL_LAYER, mode, "shape", shape.label, config,
                        layer_providers(layers, x, dy, mode), memory=(mode == "full"))


# ----------------------------------------------------------------------------- the step
@dataclass
class StepShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    batch: int
    seq: int
    r: int


def step_shape(ctx: BenchContext) -> StepShape:
    if ctx.quick:
        return StepShape(layers=2, hidden=64, intermediate=160, heads=4, vocab=512, batch=2, seq=32, r=4)
    return StepShape(layers=4, hidden=512, intermediate=1376, heads=8, vocab=4096, batch=8, seq=256, r=16)


def build_llama(s: StepShape, device: torch.device, seed: int = 0) -> nn.Module:
    """A random Llama built from a config (no download); SDPA attention, as users run it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                         max_position_embeddings=max(s.seq, 128), tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device)


def lora_models(s: StepShape, dropout: float, device: torch.device) -> dict[str, nn.Module]:
    from peft import LoraConfig, get_peft_model

    from kernels.lora_layers import apply_lora

    base = build_llama(s, device)
    ours = apply_lora(copy.deepcopy(base), r=s.r, alpha=2 * s.r, dropout=dropout)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=s.r, lora_alpha=2 * s.r, lora_dropout=dropout,
                                                           target_modules="all-linear"))
    for m in (ours, peft):
        m.train()
    return {"ours": ours, "peft": peft}


def step_provider(name: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> Provider:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(_state) -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Provider(name, run=step)


def bench_step(ctx: BenchContext) -> None:
    s = step_shape(ctx)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=gen).to(ctx.device)
    batch = {"input_ids": ids, "labels": ids}
    tokens = s.batch * s.seq
    for dropout in DROPOUTS:
        models = lora_models(s, dropout, ctx.device)
        providers = [step_provider(n, m, batch) for n, m in models.items()]
        config = (f"dropout={dropout} llama L={s.layers} d={s.hidden} ff={s.intermediate} V={s.vocab} "
                  f"batch={s.batch}x{s.seq} r={s.r} AdamW")
        print(f"  {KERNEL_STEP} dropout={dropout} ({config})", flush=True)
        times = time_interleaved(ctx, providers, warmup=1, repeats=3 if ctx.quick else 5)
        for p in providers:
            q = times[p.name]
            # tokens/s from the step time: p20 of time is p80 of throughput and vice versa.
            ctx.add(KERNEL_STEP, p.name, "full", "throughput", "tokens", tokens,
                    Quantiles(tokens / q.p50 * 1e3, tokens / q.p80 * 1e3, tokens / q.p20 * 1e3), config)
            ctx.add(KERNEL_STEP, p.name, "full", "time", "tokens", tokens, q, config)
        for p in providers:
            ctx.add(KERNEL_STEP, p.name, "full", "memory", "tokens", tokens,
                    Quantiles.single(peak_memory_mib(ctx, p.run)), config)
        del models, providers


def run(ctx: BenchContext) -> None:
    missing = _missing_ours()
    if missing:
        ctx.note(f"lora: ours not benchmarked, {missing}")
        return
    bench_layers(ctx)
    bench_step(ctx)


def _missing_ours() -> str | None:
    try:
        from kernels.lora_layers import LoRALinear, apply_lora  # noqa: F401
    except Exception as exc:  # not landed yet / broken: say so, never stub
        return f"kernels.lora_layers is not importable ({type(exc).__name__}: {exc})"
    return None
