"""CPU time of one decoding step on SmolLM2-135M: HF's forward against eval.fast_decode's lean step.

After the same HF prefill (``--prompt-len`` tokens into eval.kv_cache's preallocated cache), each
side runs ``--steps`` one-token steps and its CPU time per step (``time.process_time``, so other
processes on a shared core count less) is recorded; ``--rounds`` rounds alternate the order.
Three sides: ``hf`` (the model's forward, what eval.generate ran before fast_decode), ``lean-copy``
(the lean step on the ``[in, out]`` weight copy, what batches of <= fast_decode.COPY_MAX_ROWS rows
use) and ``lean-views`` (the lean step on the model's own tensors, what larger batches use).
``--lora`` wraps every projection in kernels.lora_layers.LoRALinear (r 16) first; ``--bf16`` casts the
model to bf16 first (what ``eval.generate``'s ``precision="bf16"`` decodes: a bf16 copy).

Run: ``OMP_NUM_THREADS=1 taskset -c 1 python -m bench.probes.fast_decode_step --batch 1 --rounds 8``.
``--profile`` then runs one more round of ``hf`` and of the lean side the sampler picks at that batch
under ``torch.profiler`` and prints both sides' ops by self CPU time (where a step's time goes; the
profiler's overhead inflates small ops, so read shares, not absolute times). ``--threads 2`` matches
``python -m bench generate``'s default.
Seen (2026-12-06, 1 thread, a core shared with two training jobs) in eval/fast_decode.py's docstring.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import eval.fast_decode as fast_decode
from bench.bench_generate import load_model
from eval.generate import _cache_kwarg
from eval.kv_cache import preallocated_cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probes.fast_decode_step")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="decode a bf16 model (CPUs with native bf16)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print each side's ops by self CPU time")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sampler_copy_rows = fast_decode.COPY_MAX_ROWS  # the sides below reset it
    model = load_model(args.model)[0]
    if args.lora:
        from kernels.lora_layers import apply_lora

        apply_lora(model, r=16, alpha=32)
        model.eval()
    if args.bf16:
        model = model.to(torch.bfloat16)
    batch, plen, steps = args.batch, args.prompt_len, args.steps
    ids = torch.randint(0, model.config.vocab_size, (batch, plen), generator=torch.Generator().manual_seed(0))
    attention = torch.ones(batch, plen + steps, dtype=torch.long)
    positions = torch.arange(plen)[None].expand(batch, plen)
    cache_name = _cache_kwarg(model)

    def prefill():
        cache = preallocated_cache(plen + steps)
        model(input_ids=ids, attention_mask=attention[:, :plen], position_ids=positions, use_cache=True,
              logits_to_keep=1, **{cache_name: cache})
        return cache

    def lean(copy_max_rows: int):
        def run(cache) -> None:
            fast_decode.COPY_MAX_ROWS = copy_max_rows
            decoder = fast_decode.LeanDecoder.for_model(model, cache)
            token, last = torch.zeros(batch, dtype=torch.long), torch.full((batch, 1), plen - 1)
            for s in range(steps):
                last += 1
                decoder.step(token, last, attention[:, :plen + 1 + s])
        return run

    def hf(cache) -> None:
        token, last = torch.zeros(batch, 1, dtype=torch.long), torch.full((batch, 1), plen - 1)
        for s in range(steps):
            last += 1
            model(input_ids=token, attention_mask=attention[:, :plen + 1 + s], position_ids=last, use_cache=True,
                  logits_to_keep=1, **{cache_name: cache})

    sides = {"hf": hf, "lean-copy": lean(1 << 30), "lean-views": lean(0)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    with torch.no_grad():
        lean(1 << 30)(prefill())  # the weight copy is made once, outside the timing
        for r in range(args.rounds):
            for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
                cache = prefill()
                start = time.process_time()
                sides[name](cache)
                times[name].append((time.process_time() - start) / steps * 1e3)
    for name, values in times.items():
        print(f"batch {batch} {name:10s} CPU ms/step median {statistics.median(values):6.1f} "
              f"min {min(values):6.1f}  all {[round(v) for v in values]}")
    hf_median = statistics.median(times["hf"])
    for name in ("lean-copy", "lean-views"):
        print(f"hf / {name}: {hf_median / statistics.median(times[name]):.2f}x")
    if args.profile:
        # The lean layout the sampler itself picks at this batch size (packed bf16 ignores the switch).
        sampler_side = "lean-copy" if batch <= sampler_copy_rows else "lean-views"
        for name in ("hf", sampler_side):
            print_profile(name, sides[name], prefill, steps)
    return 0


def print_profile(name: str, side, prefill, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        cache = prefill()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            side(cache)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n{name}: {total / steps / 1e3:.1f} ms/step profiled (self CPU time summed over ops)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48))


if __name__ == "__main__":
    raise SystemExit(main())
