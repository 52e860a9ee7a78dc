"""One decoding step's attention call on the CPU: HF's form against eval.fast_decode's grouped queries.

At one new token a step, each layer's attention is a single SDPA call over the KV cache. HF's form
(and the lean step's in fp32) gives every query head one query position (``q`` [rows, heads, 1, d],
``enable_gqa``); the grouped form gives each key/value head its ``heads / kv_heads`` query heads as
query positions of one head (``q`` [rows, kv_heads, groups, d], no expansion), the same sums for each
query. This probe times both calls at SmolLM2-135M's decoding shape (batch 16, 9 heads, 3 key/value
heads, head dim 64, a boolean padding mask) in bf16 and fp32, sides interleaved in one process, and
counts at how many cache lengths the two outputs are not bit for bit equal, and in how many elements.

Run: ``python -m bench.probes.decode_attention`` (2 threads by default; about a minute).
Results: docs/benchmarks.md, issue 23's sampler section (run AG).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def attention_calls(rows: int, heads: int, kv_heads: int, head_dim: int, keys: int, dtype: torch.dtype,
                    seed: int):
    generator = torch.Generator().manual_seed(seed)
    capacity = keys + 64  # a preallocated cache read through a slice, as the sampler reads it

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    q = rand(rows, heads, 1, head_dim)
    cache_k, cache_v = rand(rows, kv_heads, capacity, head_dim), rand(rows, kv_heads, capacity, head_dim)
    k, v = cache_k[:, :, :keys], cache_v[:, :, :keys]
    attend = torch.ones(rows, keys, dtype=torch.bool)
    attend[: rows // 4, : min(10, keys - 1)] = False  # left padding on a quarter of the rows
    mask = attend[:, None, None, :]
    scale = head_dim ** -0.5

    def hf_form() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads)

    def grouped() -> torch.Tensor:
        queries = q.view(rows, kv_heads, heads // kv_heads, head_dim)
        return F.scaled_dot_product_attention(queries, k, v, attn_mask=mask, scale=scale).view(rows, heads, 1, head_dim)

    return hf_form, grouped


def time_us(call, repeats: int) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probes.decode_attention")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--max-keys", type=int, default=320, help="equality is checked at 1..max-keys keys")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    heads, kv_heads, head_dim = 9, 3, 64  # SmolLM2-135M
    print(f"decode attention: {args.rows} rows, {heads} heads / {kv_heads} kv heads, head dim {head_dim}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; us a call, median of {args.rounds} "
          f"interleaved rounds of {args.repeats}")
    for dtype in (torch.bfloat16, torch.float32):
        for keys in (64, 128, 192):
            hf_form, grouped = attention_calls(args.rows, heads, kv_heads, head_dim, keys, dtype, seed=keys)
            times = {"hf form": [], "grouped": []}
            for r in range(args.rounds):
                order = [("hf form", hf_form), ("grouped", grouped)]
                for name, call in (order if r % 2 == 0 else order[::-1]):
                    times[name].append(time_us(call, args.repeats))
            hf_us, grouped_us = statistics.median(times["hf form"]), statistics.median(times["grouped"])
            print(f"  {str(dtype).removeprefix('torch.'):8s} {keys:4d} keys: hf form {hf_us:7.0f} us, "
                  f"grouped {grouped_us:7.0f} us, hf form / grouped {hf_us / grouped_us:5.2f}x")
        unequal, largest = [], 0.0
        for keys in range(1, args.max_keys + 1):
            hf_form, grouped = attention_calls(args.rows, heads, kv_heads, head_dim, keys, dtype, seed=keys)
            a, b = hf_form(), grouped()
            if not torch.equal(a, b):
                unequal.append(int((a != b).sum()))
                largest = max(largest, (a.float() - b.float()).abs().max().item())
        elements = args.rows * heads * head_dim
        print(f"  {str(dtype).removeprefix('torch.'):8s} outputs not bit for bit equal at {len(unequal)} of "
              f"{args.max_keys} cache lengths, in {min(unequal, default=0)}-{max(unequal, default=0)} of "
              f"{elements} elements there; largest |difference| {largest:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
