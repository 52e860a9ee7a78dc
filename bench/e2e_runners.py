"""The trainers an end-to-end benchmark runs, each as a user runs it, in a process of its own.

``python -m bench.e2e_runners --spec JSON`` trains one side (:class:`SideSpec`) and prints one
line ``E2E_RESULT {json}`` (:class:`SideResult`) as its last line of output; the driver,
``bench/e2e_process.py``, starts one such process per side and round. Why a process each: two
trainers measured in one process move each other's numbers (allocator state, thread pools,
what a previous run left in the caches): issue 23 measured -27% to +73% on the peer that way.

Sides (``SideSpec.kind``):

* ``ours``: ``python -m trainer.run key=value ...``'s own ``main`` (config parsing, preflight,
  summary: the path a user runs), with ``trainer.loop.train`` wrapped only to pass the step
  clock as ``on_step_end``;
* ``hf``: ``transformers.Trainer`` on the same rows, over PEFT LoRA (``all-linear``, alpha 2r)
  when ``method=lora``, else full fine-tuning; ``bf16`` = HF's autocast over fp32 weights;
* ``trl``: TRL's ``SFTTrainer`` on the same text rows (it tokenizes them itself), LoRA through
  ``peft_config``, TRL's defaults otherwise (chunked NLL head with per-step entropy and token
  accuracy, ``padding_free=False``) except ``gradient_checkpointing`` (``SideSpec.checkpointing``:
  TRL's default is on) and what every side shares (batch, steps, lr, schedule, clipping, no
  evaluation, no checkpoints, no logging inside the run).

Shared here (issue 23 part 4): the step clock, peak RSS, tensor peak memory, the HF and TRL
runners, used by ``bench_e2e.py`` and ``e2e_smollm2.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULT_MARK = "E2E_RESULT "
KINDS = ("ours", "hf", "trl")


@dataclass
class SideSpec:
    """One side of an end-to-end comparison: what a child process trains."""

    kind: str  # ours | hf | trl
    model_dir: str
    data: str
    output_dir: str
    method: str  # lora | full (ours also: ewc | lora_ewc)
    precision: str  # bf16 | fp32 (ours also: auto)
    batch: int
    seq: int
    steps: int  # total optimizer steps, warm-up included
    device: str = "cpu"
    lora_r: int = 16
    lora_dropout: float = 0.0
    checkpointing: bool = False  # hf / trl: gradient checkpointing
    liger: bool = False  # hf / trl: use_liger_kernel=True
    tensor_memory: bool = False  # CPU: run under the tensor-memory tracker (slow: never a timed run)
    extra: dict[str, str] = field(default_factory=dict)  # ours: further key=value settings

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"SideSpec.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.precision not in ("bf16", "fp32", "auto") or (self.precision == "auto" and self.kind != "ours"):
            raise ValueError(f"SideSpec.precision: {self.precision!r} (bf16 | fp32; auto for ours only)")


@dataclass
class SideResult:
    """What one child process measured (the JSON of its ``E2E_RESULT`` line)."""

    stamps_s: list[float]  # perf_counter at each on_step_end, relative to the first
    losses: list[float]  # training loss of each step (before that step's update)
    vmhwm_mib: float  # peak resident set size of the whole process (VmHWM), MiB
    tensor_peak_mib: float | None  # CUDA: max_memory_allocated; CPU: the tracker's peak, when asked
    wall_s: float  # the whole process body: imports after start-up, model load, training
    threads: int
    info: dict = field(default_factory=dict)  # hf / trl: checkpointing, loss_type, padding_free, bf16, liger

    def step_ms(self, warmup: int) -> list[float]:
        """Durations of steps ``warmup + 1`` .. N (1-based) in ms: step k takes stamp k - stamp k-1."""
        gaps = [(b - a) * 1e3 for a, b in zip(self.stamps_s, self.stamps_s[1:], strict=False)]
        return gaps[max(warmup - 1, 0):]  # gaps[0] is step 2


# ----------------------------------------------------------------------------- measuring
class StepClock:
    """A time stamp (and the step's loss) at the end of every optimizer step; syncs CUDA first
    so that a stamp means the step's work is done."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.stamps: list[float] = []
        self.losses: list[float] = []
        self.pending_loss: torch.Tensor | float | None = None  # set by the trainer's training_step
        self.info: dict = {}  # settings the trainer ran with (hf / trl)

    def tick(self, loss: torch.Tensor | float | None = None) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        loss = self.pending_loss if loss is None else loss
        self.losses.append(float(loss) if loss is not None else float("nan"))
        self.pending_loss = None


def peak_rss_mib() -> float:
    """The process's peak resident set size (``VmHWM`` in /proc/self/status), MiB; on systems
    without /proc, ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_peak_mib(device: str, fn: Callable[[], None]) -> float:
    """Peak tensor memory of ``fn()`` above what was live before it: CUDA's allocator peak, or
    on CPU the harness's TensorMemoryTracker (bench/README.md, "Peak memory")."""
    if device.startswith("cuda"):
        torch.cuda.init()  # a fresh process: the allocator's statistics need the context first
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from bench.harness import TensorMemoryTracker

    tracker = TensorMemoryTracker()
    with tracker:
        fn()
    return tracker.peak / 2**20


# ----------------------------------------------------------------------------- ours
def our_cli_args(spec: SideSpec) -> list[str]:
    """The ``key=value`` command line of ``python -m trainer.run`` for ``spec``."""
    values = dict(
        model=spec.model_dir, data=spec.data, method=spec.method, output_dir=spec.output_dir, validation_split=0.0,
        per_device_train_batch_size=spec.batch, max_length=spec.seq, max_steps=spec.steps, learning_rate=1e-4,
        lr_scheduler_type="linear", lora_r=spec.lora_r, lora_alpha=2 * spec.lora_r, lora_dropout=spec.lora_dropout,
        max_grad_norm=1.0, save_steps=0, logging_steps=1000, progress="false", device=spec.device,
        bf16={"bf16": "true", "fp32": "false", "auto": "auto"}[spec.precision],
    )
    if spec.method in ("ewc", "lora_ewc"):
        # The Fisher pass runs before the first step (outside the timed steps); a few rows keep it short.
        values.update(fisher_data=spec.data, fisher_samples=spec.batch)
    values.update(spec.extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_ours(spec: SideSpec, clock: StepClock | None) -> None:
    """``trainer.run.main`` on ``spec``'s command line; a non-zero exit is an error naming it."""
    import trainer.loop
    from trainer import run as trainer_run

    original = trainer.loop.train
    # trainer.run imports train from trainer.loop inside main (at call time); a module-level
    # name in trainer.run, should it ever have one, is patched as well.
    targets = [m for m in (trainer.loop, trainer_run) if getattr(m, "train", None) is original]
    if clock is not None:
        def clocked_train(cfg, on_step_end=None):
            return original(cfg, on_step_end=lambda step, record: clock.tick(record.get("loss")))

        for module in targets:
            module.train = clocked_train
    try:
        code = trainer_run.main(our_cli_args(spec))
    finally:
        for module in targets:
            module.train = original
    if code != 0:
        raise RuntimeError(f"python -m trainer.run exited {code} (its stderr above says why)")


# ----------------------------------------------------------------------------- the peers
def _common_training_args(spec: SideSpec) -> dict:
    """TrainingArguments every peer side shares: the same schedule, no evaluation, no
    checkpoints, no logging inside the timed steps."""
    return dict(output_dir=spec.output_dir, per_device_train_batch_size=spec.batch, max_steps=spec.steps,
                learning_rate=1e-4, lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0,
                save_strategy="no", eval_strategy="no", report_to="none", logging_steps=1000, disable_tqdm=True,
                dataloader_num_workers=0, use_cpu=spec.device == "cpu", seed=0, bf16=spec.precision == "bf16",
                use_liger_kernel=spec.liger)


def _lora_config(spec: SideSpec):
    from peft import LoraConfig

    return LoraConfig(r=spec.lora_r, lora_alpha=2 * spec.lora_r, lora_dropout=spec.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def _clocked(trainer_cls, clock: StepClock | None):
    """``trainer_cls`` whose ``training_step`` hands its loss to ``clock`` and whose
    ``on_step_end`` (a callback, as both trainers have) stamps it."""
    from transformers import TrainerCallback

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if clock is not None:
                clock.tick()

    class Clocked(trainer_cls):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            if clock is not None:
                clock.pending_loss = loss.detach()
                if not clock.info:  # what the trainer actually ran with, for the report
                    clock.info = {"checkpointing": bool(getattr(self.model, "is_activation_checkpointing", False)),
                                  "loss_type": getattr(self.args, "loss_type", "model"),
                                  "padding_free": getattr(self.args, "padding_free", False),
                                  "bf16": bool(self.args.bf16), "liger": bool(self.args.use_liger_kernel)}
            return loss

    return Clocked, Stamp()


def hf_trainer_run(spec: SideSpec, clock: StepClock | None) -> None:
    """``transformers.Trainer`` on ``text`` rows cut to ``spec.seq`` tokens (labels = inputs)."""
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
    if spec.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(spec))

    def tokenize(row):
        ids = tokenizer(row["text"], truncation=True, max_length=spec.seq)["input_ids"]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

    dataset = load_dataset("json", data_files=spec.data, split="train").map(tokenize, remove_columns=["text"])
    cls, stamp = _clocked(Trainer, clock)
    # Checkpointing only when asked (``activation_checkpointing``: transformers 5's name for it).
    checkpointing = {"activation_checkpointing": True} if spec.checkpointing else {}
    cls(model=model, args=TrainingArguments(**_common_training_args(spec), **checkpointing), train_dataset=dataset,
        data_collator=default_data_collator, callbacks=[stamp]).train()


def trl_sft_run(spec: SideSpec, clock: StepClock | None) -> None:
    """TRL ``SFTTrainer`` on the same ``text`` rows: the model given by its path (TRL loads it in
    fp32), LoRA through ``peft_config``, ``max_length=seq`` (TRL appends EOS, then keeps the
    first ``seq`` tokens: the same rows as the other sides, the EOS cut off)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    dataset = load_dataset("json", data_files=spec.data, split="train")
    # TRL's default turns checkpointing on (its ``gradient_checkpointing=True``, an alias of
    # transformers 5's ``activation_checkpointing``): left to that default for the default side.
    checkpointing = {} if spec.checkpointing else {"activation_checkpointing": False}
    args = SFTConfig(**_common_training_args(spec), **checkpointing, max_length=spec.seq)
    cls, stamp = _clocked(SFTTrainer, clock)
    cls(model=spec.model_dir, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=_lora_config(spec) if spec.method == "lora" else None, callbacks=[stamp]).train()


RUNNERS: dict[str, Callable[[SideSpec, StepClock | None], None]] = {
    "ours": run_ours, "hf": hf_trainer_run, "trl": trl_sft_run}


# ----------------------------------------------------------------------------- the child process
def run_side(spec: SideSpec) -> SideResult:
    """Train ``spec`` in this process and measure it (meant for a fresh process: RSS is the
    process's own peak)."""
    started = time.perf_counter()
    clock = StepClock(spec.device)
    runner = RUNNERS[spec.kind]
    tensor_peak = None
    if spec.tensor_memory or spec.device.startswith("cuda"):
        tensor_peak = tensor_peak_mib(spec.device, lambda: runner(spec, clock))
    else:
        runner(spec, clock)
    if not clock.stamps:
        raise RuntimeError(f"{spec.kind}: training ran no step (no on_step_end)")
    first = clock.stamps[0]
    return SideResult(stamps_s=[s - first for s in clock.stamps], losses=clock.losses, vmhwm_mib=peak_rss_mib(),
                      tensor_peak_mib=tensor_peak, wall_s=time.perf_counter() - started,
                      threads=torch.get_num_threads(), info=clock.info)


def parse_result(output: str) -> SideResult:
    """The last ``E2E_RESULT`` line of a child's output."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_MARK):
            return SideResult(**json.loads(line[len(RESULT_MARK):]))
    raise ValueError(f"no {RESULT_MARK.strip()} line in the child's output")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e_runners",
                                     description="Train one side of an e2e benchmark; print its E2E_RESULT line.")
    parser.add_argument("--spec", required=True, help="SideSpec as JSON")
    args = parser.parse_args(argv)
    try:
        spec = SideSpec(**json.loads(args.spec))
    except (TypeError, ValueError) as exc:
        print(f"bench.e2e_runners: bad --spec: {exc}", file=sys.stderr)
        return 2
    result = run_side(spec)
    print(RESULT_MARK + json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
