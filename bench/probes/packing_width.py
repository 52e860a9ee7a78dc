"""A packed micro-batch's step at two row widths: the longest example's, and packed_row_budget's.

``OMP_NUM_THREADS=1 taskset -c 0 python -m bench.probes.packing_width [--task flights] [--batches 6]``

SmolLM2-135M-Instruct with LoRA r8 on every linear layer (the trainer's defaults), bf16 autocast
where the CPU has native bf16, the first ``--batches`` micro-batches of 16 rows that a run of
``chat-task:TASK`` at 10% self-replay (seed 0's cached answers) plans; each batch laid out both
ways and run forward and backward (HF logits, fp32 cross-entropy), the two layouts interleaved in
one process, order reversed every other round. Prints tokens computed and seconds a step for each.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="flights", choices=["flights", "reviews"])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.model_source import resolve_model
    from kernels import apply_lora
    from kernels.backend import cpu_has_native_bf16
    from trainer.data import read_jsonl, tokenize_file
    from trainer.demo.chat_tasks import ensure_chat_task
    from trainer.packing import model_inputs, pack_examples, packed_row_budget, token_loss_sum_from_logits
    from trainer.self_replay import SelfReplaySettings, build_self_replay, prompt_bank, select_prompts

    model_dir = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    replay_path, _ = build_self_replay(model, tok, select_prompts(prompt_bank(None), 256, 0),
                                       SelfReplaySettings(batch_size=32), log=print)  # cached after one run
    apply_lora(model, r=8, alpha=16)
    model.train()
    task_path = ensure_chat_task(args.task).train
    task = tokenize_file(task_path, tok, 256, read_jsonl(task_path)).examples
    replay = tokenize_file(replay_path, tok, 256, read_jsonl(replay_path)).examples
    # 16 rows a batch, 1 or 2 of them replay rows (10%), alternating as the run's plan does
    batches = [task[16 * b: 16 * b + 16 - (1 + b % 2)] + replay[2 * b: 2 * b + 1 + b % 2]
               for b in range(args.batches)]
    bf16 = cpu_has_native_bf16()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def layouts(rows):
        lengths = [len(ex.input_ids) for ex in rows]
        return {"longest": pack_examples(rows, max_row_tokens=max(lengths)),
                "budget": pack_examples(rows, max_row_tokens=packed_row_budget(lengths))}

    def step(batch) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with autocast:
            logits = model(**model_inputs(batch), use_cache=False).logits
        token_loss_sum_from_logits(logits, batch["shift_labels"]).backward()
        return time.perf_counter() - start

    laid = [layouts(rows) for rows in batches]
    print(f"{args.task}, {len(batches)} batches of 16 rows (1-2 replay), LoRA r8, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} thread(s)")
    for name in ("longest", "budget"):
        shapes = [tuple(b[name]["input_ids"].shape) for b in laid]
        print(f"  {name:8s} rows x width: {shapes}; tokens computed {sum(k * w for k, w in shapes)}")
    step(laid[0]["longest"])  # warm-up
    times = {"longest": [], "budget": []}
    for r in range(args.rounds):
        for name in (("longest", "budget") if r % 2 == 0 else ("budget", "longest")):
            times[name].append(sum(step(b[name]) for b in laid) / len(laid))
    for name, ts in times.items():
        rounds = ", ".join(f"{t:.2f}" for t in ts)
        print(f"  {name:8s} seconds a step: median {statistics.median(ts):.2f} (rounds {rounds})")
    ratio = statistics.median(times["longest"]) / statistics.median(times["budget"])
    print(f"  longest / budget: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
