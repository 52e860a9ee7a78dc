"""Causal attention forward + backward on CPU at SmolLM2-135M's training shape, three ways.

Issue 23's bf16 profile (bench/results/cpu-2026-12-07-Y-profile_lora_bf16_512.txt) puts 31% of a
LoRA step at 8 x 512 in PyTorch's CPU flash attention (``_scaled_dot_product_flash_attention_for_cpu``
and its backward), about a third of the GEMM rate. This probe asks whether anything this stack
offers from Python does better, per layer (batch 8, 9 heads, 512 tokens, head dim 64, bf16):

* ``flash``: ``F.scaled_dot_product_attention(is_causal=True)``, what HF's sdpa attention runs;
* ``math``: an autograd Function on batched bf16 GEMMs (``Q Kᵀ``, ``P V``) with an fp32 softmax,
  the ``[heads, S, S]`` probabilities recomputed in backward from the saved log-sum-exp (nothing
  quadratic kept): the "attention at GEMM speed" idea, as plain torch;
* ``flex``: ``torch.compile(flex_attention)`` with a causal block mask (reported if unsupported).

Sides interleaved round by round in this one process, median milliseconds of forward + backward;
and the math path's output against float64 (max abs error). Run on an idle machine:
``python -m bench.probes.attention_cpu [--rounds 5] [--threads N]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPE = (8, 9, 512, 64)  # batch, heads, tokens, head dim (SmolLM2-135M: 9 query heads of 64)


class MathAttention(torch.autograd.Function):
    """Causal softmax attention from batched GEMMs; backward recomputes P from the saved row LSE."""

    @staticmethod
    def _probabilities(q, k, lse=None):
        scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)
        s = scores.shape[-1]
        scores.masked_fill_(torch.ones(s, s, dtype=torch.bool).triu_(1), float("-inf"))
        if lse is None:
            lse = torch.logsumexp(scores, -1, keepdim=True)
        return scores.sub_(lse).exp_(), lse

    @staticmethod
    def forward(ctx, q, k, v):
        p, lse = MathAttention._probabilities(q, k)
        out = torch.matmul(p.to(q.dtype), v)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        p, _ = MathAttention._probabilities(q, k, lse)
        grad_v = torch.matmul(p.to(q.dtype).transpose(-1, -2), grad_out)
        grad_p = torch.matmul(grad_out, v.transpose(-1, -2)).float()
        delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        grad_s = p.mul_(grad_p.sub_(delta)).mul_(q.shape[-1] ** -0.5).to(q.dtype)
        return torch.matmul(grad_s, k), torch.matmul(grad_s.transpose(-1, -2), q), grad_v


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(SHAPE, generator=gen).bfloat16().requires_grad_() for _ in range(3))
    grad = torch.randn(SHAPE, generator=gen).bfloat16()
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    error = (MathAttention.apply(q, k, v).double() - exact).abs().max().item()
    sides = {"flash": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
             "math": lambda: MathAttention.apply(q, k, v)}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, SHAPE[2], SHAPE[2], device="cpu")
        flex = torch.compile(flex_attention)
        flex(q, k, v, block_mask=mask).backward(grad)  # compiles, and raises where CPU backward is missing
        sides["flex"] = lambda: flex(q, k, v, block_mask=mask)
        flex_note = "compiled"
    except Exception as exc:  # noqa: BLE001 - the probe reports what this torch cannot do
        flex_note = f"not run: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, run in sides.items():
            q.grad = k.grad = v.grad = None
            start = time.perf_counter()
            run().backward(grad)
            times[name].append((time.perf_counter() - start) * 1e3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), shape {SHAPE} bf16, "
          f"{args.rounds} rounds; math path max |error| vs float64: {error:.4f}; flex: {flex_note}")
    flash = statistics.median(times["flash"][1:])
    for name, ms in times.items():
        med = statistics.median(ms[1:])
        print(f"  {name:6s} forward+backward {med:8.1f} ms (min {min(ms[1:]):.1f}, max {max(ms[1:]):.1f}); "
              f"{med / flash:.2f}x flash's time")


if __name__ == "__main__":
    main()
