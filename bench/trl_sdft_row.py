"""TRL 1.16's ``SDFTTrainer`` on a forgetless chat task: the peer row of the real-model matrix.

``python -m bench.trl_sdft_row --task flights --out runs/trl_sdft_flights [--steps 80] [--seed 0]``

Trains PEFT LoRA r16 (alpha 32, every linear layer) on SmolLM2-135M-Instruct with TRL's
on-policy self-distillation, on the same chat rows forgetless trains on (``chat-task:NAME``: the
user turn is TRL's ``prompt``, the assistant's answer its ``privileged_context``), the same
teacher template as ``objective=sdft`` (the paper's wording; TRL's placeholder for the
demonstration is ``{privileged_context}``), the same number of sampled tokens, one rollout per
prompt, the teacher the base (adapter off), forward KL over the full vocabulary
(``distillation_mode="full_logits"``, ``distillation_alpha=0``), the first 3 sampled tokens
skipped. It then saves the adapter and scores it with forgetless's own eval (``python -m eval``,
in a fresh process) so the row is scored exactly like ours.

Written beside the adapter: ``trl_row.json`` with the wall time of training, the median
seconds per optimizer step (steps after the second: TRL's first steps warm up) and of it the
time inside ``generate`` (the rollout), and the
process's peak RSS (VmHWM). Each side of a comparison runs in its own process, as users run them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from trainer.config import SDFT_TEMPLATE


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sdft_rows(train_jsonl: Path) -> list[dict]:
    """TRL's SDFT columns from forgetless chat rows: the conversation up to the last user turn
    (a chat prompt) and the last assistant turn's text (the demonstration)."""
    rows = []
    for line in train_jsonl.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        rows.append({"prompt": messages[:-1], "privileged_context": messages[-1]["content"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="flights", help="chat task name (trainer/demo/chat_tasks.py)")
    ap.add_argument("--out", required=True, help="output directory (adapter, trl_row.json, report)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="sampled tokens per rollout (sdft_max_new_tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (forgetless's bf16=auto on this CPU)")
    ap.add_argument("--suite", default="eval/suites/chat_general_large.jsonl")
    ap.add_argument("--no-score", action="store_true", help="train only")
    args = ap.parse_args(argv)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from eval.model_source import resolve_model
    from trainer.demo.chat_tasks import ensure_chat_task

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model("smollm2-135m-instruct")
    files = ensure_chat_task(args.task)
    dataset = Dataset.from_list(sdft_rows(Path(files.train)))
    template = SDFT_TEMPLATE.replace("{demonstration}", "{privileged_context}")

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = SDFTConfig(
        output_dir=str(out / "trl"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=5, seed=args.seed, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        bf16=args.bf16, num_generations=1, generation_batch_size=args.batch_size,
        max_completion_length=args.max_new_tokens, temperature=1.0,
        teacher_model_kind="base", distillation_mode="full_logits", distillation_alpha=0.0,
        num_loss_tokens_to_skip=3, teacher_prompt_template=template, gradient_checkpointing=False,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")

    step_times: list[float] = []
    rollout_times: list[float] = []
    in_generate = {"depth": 0, "seconds": 0.0}
    # The rollout's share of a step: every call into transformers' generate() is timed (the
    # outermost one only: PEFT's generate calls the base model's), summed per optimizer step.
    from transformers.generation.utils import GenerationMixin

    plain_generate = GenerationMixin.generate

    def timed_generate(self, *a, **kw):
        in_generate["depth"] += 1
        t = time.perf_counter()
        try:
            return plain_generate(self, *a, **kw)
        finally:
            in_generate["depth"] -= 1
            if in_generate["depth"] == 0:
                in_generate["seconds"] += time.perf_counter() - t

    GenerationMixin.generate = timed_generate

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()
            in_generate["seconds"] = 0.0

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)
            rollout_times.append(in_generate["seconds"])

    trainer = SDFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config, callbacks=[StepClock()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    adapter = out / "adapter"
    trainer.model.save_pretrained(str(adapter))
    timed = step_times[2:] or step_times
    row = {"peer": "trl-1.16 SDFTTrainer + PEFT LoRA r16", "task": args.task, "steps": len(step_times),
           "train_wall_s": round(wall, 1), "median_step_s": round(statistics.median(timed), 3),
           "step_s_min": round(min(timed), 3), "step_s_max": round(max(timed), 3),
           "median_rollout_s": round(statistics.median(rollout_times[2:] or rollout_times), 3),
           "peak_rss_mb": round(peak_rss_mb(), 1), "bf16": args.bf16, "max_new_tokens": args.max_new_tokens,
           "batch_size": args.batch_size, "learning_rate": args.learning_rate, "seed": args.seed,
           "torch_threads": torch.get_num_threads()}
    (out / "trl_row.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row), flush=True)
    if args.no_score:
        return 0
    # Scored by forgetless's eval in its own process, against the same base and suites as our rows.
    cmd = [sys.executable, "-m", "eval", "--model", "smollm2-135m-instruct", "--adapter", str(adapter),
           "--base-model", "smollm2-135m-instruct", "--suite", args.suite, "--task", str(files.suite),
           "--max-drop", "10", "--max-format-rigidity", "10", "--out", str(out / "report.json"),
           "--name", f"trl-sdft-{args.task}"]
    return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
