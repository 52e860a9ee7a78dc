"""End to end: the trainer's LoRA run against Hugging Face Trainer + PEFT, and the trainer's
Fisher pass against the per-sample loop, on the same model, data and batch.

Kernel ``e2e_lora`` (issue 4's target: >= 1.0x the tokens/s of HF Trainer + PEFT):

* ``ours``        ``python -m trainer.run`` with ``method=lora`` (its ``main``, in a process of its own);
* ``hf_trainer``  ``transformers.Trainer`` over ``peft.get_peft_model(..., "all-linear")``.

Both train the same saved Llama (4 layers, 512 wide) on the same JSONL, whose rows are all
longer than ``max_length`` so every batch is exactly ``batch x max_length`` tokens with no
padding: tokens/s is then the same quantity for both.  Same r, alpha, dropout, AdamW, linear
schedule, clipping at 1.0, no evaluation, no checkpoints.  Each side runs in its own fresh
process per round, as a user runs it (``bench/e2e_process.py``: rounds in alternating order,
2 warm-up + 8 timed steps, the median of steps 3+ per process, peak RSS and peak tensor
memory per side).  Note that ``trainer.run`` puts models under ~20M parameters on one CPU
thread (``use_one_thread_for_small_models``): at this shape ours runs on one thread, HF on
torch's default, as their users get them.

Kernel ``e2e_fisher``: the Fisher pass the trainer runs before ``method=ewc`` (its own
tokenizer, collation and ``estimate_fisher`` over ``per_device_eval_batch_size`` batches of
rows of mixed lengths) against the batch-size-1 loop over the same rows.
"""
from __future__ import annotations

import json
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from bench.bench_fisher import summed_nll
from bench.bench_lora import StepShape, build_llama
from bench.e2e_process import RunPlan, measure_sides
from bench.e2e_runners import SideSpec, tensor_peak_mib
from bench.e2e_smollm2 import TARGETS as TARGETS_SMOLLM2
from bench.harness import BenchContext, Provider, Target, measure

KERNEL_LORA = "e2e_lora"
KERNEL_FISHER = "e2e_fisher"
# --shape: the 4-layer, 512-wide Llama of issue 4 (the default), or SmolLM2-135M's shape
# (bench/e2e_smollm2.py, issue 13).
DEFAULT_SHAPE = "llama-4x512"
SHAPES = (DEFAULT_SHAPE, "smollm2-135m")

TARGETS_ISSUE4 = [
    Target("issue 4: trainer LoRA run tokens/s >= 1.0x HF Trainer + PEFT, dropout 0", KERNEL_LORA, "throughput",
           "hf_trainer", config_contains="dropout=0.0 ", min_ratio=1.0),
    Target("issue 4: trainer LoRA run tokens/s >= 1.0x HF Trainer + PEFT, dropout 0.05", KERNEL_LORA,
           "throughput", "hf_trainer", config_contains="dropout=0.05", min_ratio=1.0),
]
TARGETS = TARGETS_ISSUE4 + TARGETS_SMOLLM2


def e2e_shape(ctx: BenchContext) -> StepShape:
    if ctx.quick:
        return StepShape(layers=2, hidden=64, intermediate=160, heads=4, vocab=0, batch=2, seq=32, r=4)
    return StepShape(layers=4, hidden=512, intermediate=1376, heads=8, vocab=0, batch=8, seq=256, r=16)


def write_workspace(root: Path, s: StepShape, rows: int, device: torch.device) -> tuple[Path, Path, StepShape]:
    """A saved model directory (weights + the demo tokenizer) and a JSONL of long text rows."""
    from trainer.demo.tokenizer import ALPHABET, build_tokenizer

    tokenizer = build_tokenizer()
    s = StepShape(**{**s.__dict__, "vocab": len(tokenizer)})
    model_dir = root / "model"
    build_llama(s, torch.device("cpu")).save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))
    rng = random.Random(7)
    data = root / "train.jsonl"
    letters = [c for c in ALPHABET if c not in "\n"]
    with data.open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": "".join(rng.choice(letters) for _ in range(s.seq * 2))}) + "\n")
    return model_dir, data, s


# ----------------------------------------------------------------------------- the LoRA run
def bench_lora_run(ctx: BenchContext, root: Path) -> None:
    """Ours against HF Trainer + PEFT, one process per side and round (bench/e2e_process.py)."""
    s = e2e_shape(ctx)
    plan = RunPlan(rounds=ctx.rounds or (1 if ctx.quick else 2), timed_steps=ctx.timed_steps or (1 if ctx.quick else 8),
                   warmup_steps=2, tensor_memory=ctx.tensor_memory and not ctx.quick)
    # One batch of rows, trained on at every step by both sides: step 1's losses must agree.
    model_dir, data, s = write_workspace(root, s, rows=s.batch, device=ctx.device)
    tokens = s.batch * s.seq
    for dropout in (0.05,) if ctx.quick else (0.0, 0.05):
        config = (f"dropout={dropout} llama L={s.layers} d={s.hidden} ff={s.intermediate} V={s.vocab} "
                  f"batch={s.batch}x{s.seq} r={s.r} AdamW")
        print(f"  {KERNEL_LORA} ({config})", flush=True)
        ours = SideSpec(kind="ours", model_dir=str(model_dir), data=str(data), output_dir=str(root / f"out-{dropout}"),
                        method="lora", precision="fp32", batch=s.batch, seq=s.seq, steps=plan.steps,
                        device=ctx.device.type, lora_r=s.r, lora_dropout=dropout)
        sides = {"ours": ours, "hf_trainer": replace(ours, kind="hf", output_dir=str(root / f"out-hf-{dropout}"))}
        measure_sides(ctx, KERNEL_LORA, config, tokens,
                      {n: spec for n, spec in sides.items() if ctx.only is None or n in ctx.only}, plan)


def _run_peak_mib(ctx: BenchContext, fn) -> float:
    """Peak tensor memory of ``fn()`` in this process (bench/probes; e2e sides measure theirs
    in their own process)."""
    return tensor_peak_mib(ctx.device.type, fn)


# ----------------------------------------------------------------------------- Fisher pass
def bench_fisher_pass(ctx: BenchContext, root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data import collate, pad_id_of, tokenize_file
    from trainer.demo.tokenizer import ALPHABET
    from trainer.fisher import estimate_fisher

    s = e2e_shape(ctx)
    rows, eval_batch = (8, 4) if ctx.quick else (24, 8)
    model_dir, _, s = write_workspace(root / "fisher", s, rows=1, device=ctx.device)
    rng = random.Random(8)
    letters = [c for c in ALPHABET if c not in "\n"]
    data = root / "fisher" / "general.jsonl"
    with data.open("w") as fh:
        for _ in range(rows):  # mixed lengths: half to full max_length, so padding is exercised
            fh.write(json.dumps({"text": "".join(rng.choice(letters) for _ in range(rng.randint(s.seq // 2, s.seq)))})
                     + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    examples = list(tokenize_file(str(data), tokenizer, s.seq).examples)
    pad = pad_id_of(tokenizer)
    batches = [{k: v.to(ctx.device) for k, v in collate(examples[i:i + eval_batch], pad).items()}
               for i in range(0, len(examples), eval_batch)]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(ctx.device).eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def loop(_s) -> list[torch.Tensor]:
        fisher = [torch.zeros_like(p) for p in params]
        for batch in batches:
            for i in range(batch["input_ids"].shape[0]):
                keep = batch["attention_mask"][i].bool()
                row = {k: v[i:i + 1, keep] for k, v in batch.items()}  # batch size 1, no padding
                for p in params:
                    p.grad = None
                summed_nll(model, row).backward()
                for f, p in zip(fisher, params, strict=True):
                    f.addcmul_(p.grad, p.grad)
        for p in params:
            p.grad = None
        return fisher

    config = (f"llama L={s.layers} d={s.hidden} V={s.vocab} rows={rows} T<={s.seq} "
              f"eval_batch={eval_batch} empirical")
    print(f"  {KERNEL_FISHER} ({config})", flush=True)
    saved = ctx.warmup, ctx.repeats
    ctx.warmup, ctx.repeats = 1, min(ctx.repeats, 2 if ctx.quick else 3)
    try:
        measure(ctx, KERNEL_FISHER, "full", "rows", rows, config,
                [Provider("ours", run=lambda _s: estimate_fisher(model, batches)),
                 Provider("per_sample_loop", run=loop)], memory=True)
    finally:
        ctx.warmup, ctx.repeats = saved


def run(ctx: BenchContext) -> None:
    shape = getattr(ctx, "shape", None) or DEFAULT_SHAPE
    if shape not in SHAPES:
        raise ValueError(f"e2e: unknown --shape {shape!r} (known: {', '.join(SHAPES)})")
    with tempfile.TemporaryDirectory(prefix="forgetless-bench-") as tmp:
        root = Path(tmp)
        try:
            import trainer.loop  # noqa: F401
        except Exception as exc:
            ctx.note(f"e2e: the trainer (trainer.loop) is not importable, skipped ({exc})")
            return
        if shape == "smollm2-135m":
            from bench import e2e_smollm2

            e2e_smollm2.run(ctx, root)
            return
        bench_lora_run(ctx, root)
        try:
            import trainer.fisher  # noqa: F401
        except Exception as exc:
            ctx.note(f"e2e: trainer.fisher.estimate_fisher is not importable, Fisher pass skipped ({exc})")
        else:
            bench_fisher_pass(ctx, root)
