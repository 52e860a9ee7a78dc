"""The training loop, top to bottom: load, prepare the method, plan the batches, step, save.

One optimizer step = one global batch of ``per_device_train_batch_size * gradient_accumulation_steps
* world_size`` rows, taken from the run's batch plan (``trainer.data.plan_batches``). The loss of
the step is the sum of token losses over the whole global batch divided by its count of
labelled tokens, so accumulation and the number of processes change nothing but speed.

:func:`train` reads as the list of its phases; each phase is one function below it (torchtune's
setup/train split; the setup phases live in ``trainer/setup_phases.py``): ``read_data`` -> ``load_model`` -> ``self_replay`` -> ``tokenize_data`` -> ``prepare_method``
-> ``build_optimizer`` -> ``plan_run`` -> ``restore`` -> the step loop (``train_step``,
``validate``) -> ``finish``. A new part of a run is one new function and one line in ``train``.
A step's own phases: ``rollout`` (:func:`loss_parts`: the objective, e.g. ``objective=sdft``, samples
and builds its contexts; the plain loss has nothing to do there), then each part's forward and
backward, then the optimizer and the objective's ``after_step``.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from trainer import checkpoint as ckpt
from trainer import distributed as D
from trainer.config import TrainConfig, save_yaml
from trainer.data import (
    REPLAY,
    count_input_tokens,
    count_loss_tokens,
    group_by_length,
    micro_batches,
    pad_id_of,
)
from trainer.forgetting_proxy import EvalWatch, start_eval_watch
from trainer.kl_anchor import KLAnchor, build_kl_anchor
from trainer.loss import Head, choose_head, to_device, token_weighting, validation_sums
from trainer.memory import peak_memory_mb, peak_memory_scope, reset_peak_memory
from trainer.methods import LoRAWeights, Method
from trainer.packing import BatchLayout, build_batch, resolve_layout
from trainer.sdft import LossPart, Objective, build_objective
from trainer.setup_phases import (
    BatchPlan,
    RunData,
    bf16_autocast,
    build_optimizer,
    load_model,
    log_main,
    plan_run,
    prepare_method,
    read_data,
    restore,
    self_replay,
    tokenize_data,
)

__all__ = ["TrainResult", "TrainingDiverged", "train", "load_model", "lr_at"]


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the message says what to do."""


@dataclass
class TrainResult:
    output_dir: Path
    saved_to: Path | None
    steps: int
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> training loss
    eval_losses: dict[int, float] = field(default_factory=dict)
    best_step: int | None = None
    stopped_early: bool = False
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_mb: float = 0.0
    peak_memory_scope: str = "resident, whole process"
    task_rows: int = 0
    replay_rows: int = 0
    fisher_file: Path | None = None
    last_checkpoint: Path | None = None
    # eval step -> KL(base || tuned) per validation token / task score (trainer.forgetting_proxy)
    kl_to_base_val: dict[int, float] = field(default_factory=dict)
    task_scores: dict[int, float] = field(default_factory=dict)
    stop_reason: str | None = None  # why a stop on max_kl_to_base happened, and what was kept

    def summary(self) -> str:
        share = self.replay_rows / max(1, self.task_rows + self.replay_rows)
        lines = [
            f"done: {self.steps} steps in {self.wall_seconds:.1f} s, {self.tokens_per_second:,.0f} tokens/s, "
            f"peak memory {self.peak_memory_mb:,.0f} MB ({self.peak_memory_scope})",
            f"  rows trained: {self.task_rows} task + {self.replay_rows} replay (replay share {share:.3f})",
        ]
        if self.losses:
            last = max(self.losses)
            lines.append(f"  final train loss {self.losses[last]:.4f} (step {last})")
        if self.eval_losses:
            best = self.best_step if self.best_step is not None else max(self.eval_losses)
            restored = " (stopped early, best weights restored)" if self.stopped_early and not self.stop_reason else ""
            if best in self.task_scores:  # early_stopping_metric=task: the best step is the best score's
                lines.append(f"  best task score {self.task_scores[best]:.1f} at step {best} "
                             f"(validation loss {self.eval_losses[best]:.4f}){restored}")
            else:
                lines.append(f"  best validation loss {self.eval_losses[best]:.4f} at step {best}{restored}")
        if self.stop_reason:
            lines.append(f"  {self.stop_reason}")
        if self.saved_to:
            lines.append(f"  saved: {self.saved_to}")
        if self.fisher_file:
            lines.append(f"  fisher: {self.fisher_file}")
        lines.append(f"  metrics: {self.output_dir / 'metrics.jsonl'}; config: {self.output_dir / 'config.yaml'}")
        return "\n".join(lines)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then the decay."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.lr_scheduler_type == "linear":
        return cfg.learning_rate * (1.0 - progress)
    if cfg.lr_scheduler_type == "cosine":
        return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.learning_rate


class MetricsLog:
    """metrics.jsonl (rank 0 only; records past a resume point dropped) and optional TensorBoard."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, resumed_step: int, ctx: D.DistContext):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = ctx.is_main
        self.writer = None
        if not self.enabled:
            return
        kept = []
        if resumed_step and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if json.loads(ln).get("step", 0) <= resumed_step]
        self.path.write_text("".join(ln + "\n" for ln in kept))
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Run:
    """Everything the step loop works on, built by the phases of :func:`train`."""

    cfg: TrainConfig
    ctx: D.DistContext
    out_dir: Path
    model: nn.Module
    tokenizer: object
    pad_id: int
    method: Method
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    autocast: Callable
    head: Head
    layout: BatchLayout
    kl: KLAnchor | None
    objective: Objective | None  # a loss that is not the plain one (objective=sdft), with its rollout phase
    data: RunData
    plan: BatchPlan
    state: ckpt.TrainerState
    best_weights: dict[str, torch.Tensor] | None
    metrics: MetricsLog
    result: TrainResult
    watch: EvalWatch | None = None  # what eval steps measure besides the loss (built by run_steps)

    def save_checkpoint(self, rng: dict | None = None) -> Path | None:
        weights = D.full_state_dict(self.model, trainable_only=True)
        optim_state = D.optimizer_state(self.model, self.optimizer)
        path = None
        if self.ctx.is_main:
            path = ckpt.save_checkpoint(self.out_dir, weights, optim_state, self.state, self.cfg.save_total_limit,
                                        rng=rng, best=self.best_weights)
            extra = self.objective.state_dict() if self.objective is not None else {}
            if extra:  # e.g. an EMA teacher: a resume must continue from it, not from the base
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()},
                          str(path / OBJECTIVE_STATE))
        D.barrier(self.ctx)
        return path


# ------------------------------------------------------------------------- one step

OBJECTIVE_STATE = "objective.safetensors"  # an objective's own state in a checkpoint (e.g. an EMA teacher)


def loss_parts(run: Run, step: int, micros: list[list[tuple[int, int]]]) -> list[LossPart]:
    """The step's forwards: one plain part per micro-batch, or what the objective's rollout
    phase makes of them (sampled answers and their teacher contexts beside plain replay parts)."""
    def plain(rows: list[tuple[int, int]]) -> LossPart:
        batch = build_batch([run.plan.sources[s][i] for s, i in rows], run.pad_id, run.layout.packing)
        return LossPart(rows, to_device(batch, run.ctx.device), run.head.forward)

    if run.objective is None:
        return [plain(mb) for mb in micros]
    parts = run.objective.rollout(D.unwrap(run.model), step, run.ctx.rank, micros, plain, run.autocast)
    return [part for micro_parts in parts for part in micro_parts]


def train_step(run: Run, step: int) -> dict:
    """One optimizer step on global batch ``step`` of the plan; returns its metrics record."""
    cfg, ctx, model = run.cfg, run.ctx, run.model
    t0 = time.time()
    lr = lr_at(step, run.plan.total_steps, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    rows = run.plan.batches[step]
    n_replay_rows = sum(1 for kind, _ in rows if kind == REPLAY)
    if run.layout.group_by_length:
        rows = group_by_length(rows, run.plan.sources)
    micros = micro_batches(rows, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                           ctx.rank, ctx.world_size)
    parts = loss_parts(run, step, micros)
    # Normalise by the labelled tokens of the whole global batch (all micro-batches, all ranks).
    counts = torch.tensor([sum(count_loss_tokens(p.batch) for p in parts),
                           sum(count_input_tokens(p.batch) for p in parts)], dtype=torch.float64, device=ctx.device)
    D.all_reduce_sum(counts, ctx)
    n_loss_tokens, n_tokens = float(counts[0]), int(counts[1])
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss, KL to the base
    for i, part in enumerate(parts):
        with D.no_sync(model, skip_sync=i < len(parts) - 1):
            loss_sum, hidden, head = part.forward(model, part.batch, run.autocast)
            objective = loss_sum
            if run.kl is not None:
                kl_sum = run.kl.term(part.batch, part.rows, hidden, head, run.autocast)
                objective = objective + run.kl.beta * kl_sum
                totals[1] += kl_sum.detach().double()
            # DDP averages gradients over ranks, hence the world_size factor.
            (objective * (ctx.world_size / max(n_loss_tokens, 1.0))).backward()
        totals[0] += loss_sum.detach().double()
    D.all_reduce_sum(totals, ctx)
    loss = float(totals[0]) / max(n_loss_tokens, 1.0)
    if not math.isfinite(loss):
        raise TrainingDiverged(_diverged_message("loss", loss, step + 1, run.result.last_checkpoint))
    penalty = run.method.after_backward(model)
    logging = (step + 1) % cfg.logging_steps == 0 or step + 1 == run.plan.total_steps
    if penalty is None:  # applied inside the optimizer step: computed only when it is logged
        penalty = float(run.optimizer.penalty()) if logging else None
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(_diverged_message("gradient norm", grad_norm, step + 1, run.result.last_checkpoint))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    extra = {}
    if run.objective is not None:
        run.objective.after_step(D.unwrap(model))
        extra = run.objective.step_metrics()
    run.state.step = step + 1
    run.state.tokens_seen += n_tokens
    run.state.replay_rows += n_replay_rows
    run.state.task_rows += len(rows) - n_replay_rows
    dt = max(time.time() - t0, 1e-9)
    if "rollout_seconds" in extra:
        extra["train_seconds"] = dt - extra["rollout_seconds"]
    run.result.losses[run.state.step] = loss
    return {"step": run.state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_second": n_tokens / dt, "ewc_penalty": penalty,
            "replay_share": n_replay_rows / len(rows), "tokens": n_tokens, "step_seconds": dt, **extra,
            **({"kl_to_base": float(totals[1]) / max(n_loss_tokens, 1.0)} if run.kl is not None else {})}


def validate(run: Run, record: dict) -> None:
    """Validation loss at eval_steps and at the end, with the KL to the base and the task score
    where the run measures them (``trainer.forgetting_proxy``); tracks the best step of
    ``early_stopping_metric`` (and its weights for early stopping), and notes a crossed
    ``max_kl_to_base`` (that step's weights are then no candidate)."""
    cfg, state, ctx = run.cfg, run.state, run.ctx
    if run.data.val is None or not ((cfg.eval_steps and state.step % cfg.eval_steps == 0)
                                    or state.step == run.plan.total_steps):
        return
    watch = run.watch or EvalWatch()
    eval_loss, kl = validation_sums(run.model, run.data.val.examples, cfg.per_device_eval_batch_size, run.pad_id,
                                    ctx, run.autocast, run.head, run.layout.packing,
                                    also=watch.kl.kl_sum if watch.kl is not None else None)
    record["eval_loss"] = run.result.eval_losses[state.step] = eval_loss
    seen = f"step {state.step}: eval loss {eval_loss:.4f}"
    if kl is not None:
        record["kl_to_base_val"] = run.result.kl_to_base_val[state.step] = kl
        seen += f", KL to base {kl:.4f}"
    score = None
    if watch.task is not None:
        score = record["task_score_val"] = run.result.task_scores[state.step] = watch.task.score(run.model, ctx)
        seen += f", task score {score:.1f}"
    if watch.over_bound(kl):
        watch.exceeded_at = state.step
        log_main(f"{seen}: over max_kl_to_base={watch.max_kl}", ctx)
        return
    if watch.max_kl is not None:
        state.kl_safe_step = state.step
        if cfg.early_stopping_patience == 0:  # what a later stop on the bound keeps
            run.best_weights = D.full_state_dict(run.model, trainable_only=True)
    if cfg.early_stopping_metric == "task":
        improved = state.best_task_score is None or score > state.best_task_score
        if improved:
            state.best_task_score = score
    else:
        improved = state.best_eval_loss is None or eval_loss < state.best_eval_loss
    if improved:
        # under metric=task, best_eval_loss is the validation loss at the best score's step
        state.best_eval_loss, state.best_step, state.evals_without_improvement = eval_loss, state.step, 0
        if cfg.early_stopping_patience > 0:
            run.best_weights = D.full_state_dict(run.model, trainable_only=True)
    else:
        state.evals_without_improvement += 1
    best = (f"best {state.best_task_score:.1f}" if cfg.early_stopping_metric == "task"
            else f"best {state.best_eval_loss:.4f}")
    log_main(f"{seen} ({best} at step {state.best_step})", ctx)


def run_steps(run: Run, on_step_end: Callable[[int, dict], None] | None) -> int:
    """The step loop; returns the tokens trained in this process's run (for tokens/s).

    On Ctrl-C the step in flight (if any) is dropped; the checkpoint holds the last completed
    one and the RNG as it was when that step ended, so a resume replays the very same run."""
    cfg, state = run.cfg, run.state
    bar = tqdm(total=run.plan.total_steps, initial=state.step, disable=not (cfg.progress and run.ctx.is_main),
               dynamic_ncols=True, desc=f"{cfg.method}")
    tokens = 0
    if run.watch is None:
        run.watch = start_eval_watch(run, isinstance(run.method.weights, LoRAWeights), lambda text: log_main(text, run.ctx))
    step_rng = ckpt.rng_state()
    try:
        while state.step < run.plan.total_steps:
            record = train_step(run, state.step)
            tokens += record.pop("tokens")
            validate(run, record)
            if state.step % cfg.logging_steps == 0 or state.step == run.plan.total_steps or "eval_loss" in record:
                run.metrics.write(record)
            split = ({"rollout": f"{record['rollout_seconds']:.1f}s", "train": f"{record['train_seconds']:.1f}s"}
                     if "rollout_seconds" in record else {})
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_second']:,.0f}", **split)
            if "sample" in record and (state.step % cfg.logging_steps == 0 or state.step == run.plan.total_steps):
                log_main(f"step {state.step} sample: {record['sample'][:300]!r}", run.ctx)
            bar.update(1)
            if cfg.save_steps and state.step % cfg.save_steps == 0:
                run.result.last_checkpoint = run.save_checkpoint()
            step_rng = ckpt.rng_state()  # the RNG as of state.step: what an interrupt checkpoint restores
            if on_step_end is not None:
                on_step_end(state.step, record)
            if run.watch.exceeded_at is not None:
                run.result.stopped_early = True
                break
            if 0 < cfg.early_stopping_patience <= state.evals_without_improvement:
                log_main(f"early stopping at step {state.step}: no improvement in {cfg.early_stopping_patience} "
                     f"evaluations", run.ctx)
                run.result.stopped_early = True
                break
    except KeyboardInterrupt:
        bar.close()
        state_before = state.step
        run.result.last_checkpoint = run.save_checkpoint(rng=step_rng)
        log_main(f"interrupted at step {state_before}: checkpoint saved to {run.result.last_checkpoint}; "
             f"continue with resume_from_checkpoint=latest", run.ctx)
        D.teardown(run.ctx)
        raise
    bar.close()
    return tokens


def finish(run: Run) -> None:
    """Best weights back (early stopping, or the last ones under max_kl_to_base), then the method
    saves the model or adapter."""
    cfg, state, ctx = run.cfg, run.state, run.ctx
    crossed = run.watch.exceeded_at if run.watch is not None else None
    if crossed is not None and run.best_weights is not None:
        # With early stopping on, best_weights is the best step under the bound; else the last one under it.
        kept = state.best_step if cfg.early_stopping_patience > 0 and state.best_step is not None else state.kl_safe_step
        D.load_trainable(run.model, run.best_weights)
        run.result.stop_reason = (f"stopped at step {crossed}: KL to base {run.result.kl_to_base_val[crossed]:.4f} > "
                                  f"max_kl_to_base={cfg.max_kl_to_base}; kept the weights of "
                                  + (f"step {kept}" if kept else "the start (no eval step was under the bound)"))
        log_main(run.result.stop_reason, ctx)
    elif cfg.early_stopping_patience > 0 and run.best_weights is not None and state.best_step != state.step:
        D.load_trainable(run.model, run.best_weights)
        what = (f"task score {state.best_task_score:.1f}" if cfg.early_stopping_metric == "task"
                else f"eval loss {state.best_eval_loss:.4f}")
        log_main(f"restored the best weights (step {state.best_step}, {what})", ctx)
    run.result.best_step = state.best_step
    run.result.task_rows, run.result.replay_rows = state.task_rows, state.replay_rows  # the whole run, resumes included
    full_state = D.full_state_dict(run.model, trainable_only=False) if D.is_fsdp(run.model) else None
    if ctx.is_main:
        run.result.saved_to = run.method.save(D.unwrap(run.model), run.tokenizer, run.out_dir, state_dict=full_state)
    run.result.peak_memory_mb = peak_memory_mb(ctx.device)
    run.metrics.close()


# ------------------------------------------------------------------------------ a run


def train(cfg: TrainConfig, on_step_end: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run one training job as ``cfg`` says (paths already resolved, see ``trainer.run``)."""
    t_start = time.time()
    ctx = D.setup(cfg.device)
    memory_reset = reset_peak_memory(ctx.device)  # this run's peak, not an earlier run's in this process
    out_dir = Path(cfg.output_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    rows = read_data(cfg)
    model, tokenizer = load_model(cfg, ctx.device)
    use_bf16, autocast = bf16_autocast(cfg, ctx.device, model)
    pad_id = pad_id_of(tokenizer)
    cfg = self_replay(cfg, model, tokenizer, rows, ctx)
    data = tokenize_data(cfg, tokenizer, rows, ctx)
    method = prepare_method(cfg, model, tokenizer, rows, pad_id, out_dir, ctx)
    if use_bf16 and isinstance(method.weights, LoRAWeights) and not cfg.fsdp:
        # FSDP flattens a unit's parameters into one tensor of one dtype: its base stays fp32.
        from kernels.lora_layers import store_base_weights

        held = store_base_weights(model, torch.bfloat16)
        if held:
            log_main(f"memory: LoRA's frozen base weights held in bf16 ({held:,} parameters; bf16 autocast "
                     "multiplies them in bf16 anyway, so the numbers do not change)", ctx)
    # Not under gradient checkpointing, which recomputes whole layers: the remade-h note would
    # keep gate(x) and up(x) alive past the checkpoint that meant to drop them.
    if cfg.recompute_mlp and not cfg.gradient_checkpointing:
        from kernels.gated_mlp import recompute_mlp_activations

        mlps = recompute_mlp_activations(model)
        log_main(f"memory: {mlps} gated MLPs keep only gate(x) and up(x) for backward" if mlps else
             "memory: no gated MLP recognised; recompute_mlp changes nothing for this model", ctx)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head = choose_head(model, data.task.examples[0], pad_id, ctx.device, cfg.fused_head,
                       sharded=cfg.fsdp and ctx.enabled, weighting=token_weighting(cfg))
    if not head.fused:
        log_main(f"loss: the model's own logits ({head.reason})", ctx)
    layout = resolve_layout(cfg.packing, cfg.group_by_length, model)
    plan = plan_run(cfg, data, ctx)
    kl = build_kl_anchor(cfg, model, isinstance(method.weights, LoRAWeights), head.fused, plan.sources,
                         {key for batch in plan.batches for key in batch}, pad_id, ctx.device, autocast,
                         cfg.progress and ctx.is_main)
    objective = build_objective(cfg, model, tokenizer, rows[cfg.data], isinstance(method.weights, LoRAWeights),
                                head.fused, plan.sources, pad_id, ctx.device)
    log_main(f"batches: {layout.reason}", ctx)
    model.train()
    model = D.wrap_model(model, ctx, cfg.fsdp)
    params = [p for p in model.parameters() if p.requires_grad]
    log_main(f"method: {cfg.method}; {sum(p.numel() for p in params):,} of "
         f"{sum(p.numel() for p in model.parameters()):,} parameters train; world size {ctx.world_size}; "
         f"device {ctx.device}; precision {'bf16 autocast' if use_bf16 else 'fp32'}", ctx)
    optimizer = build_optimizer(cfg, params, method, sharded=D.is_fsdp(model))
    state, best_weights = restore(cfg, model, optimizer, out_dir, ctx)
    if objective is not None and cfg.resume_from_checkpoint:
        saved = ckpt.resolve_resume(cfg.resume_from_checkpoint, out_dir) / OBJECTIVE_STATE
        if saved.is_file():
            from safetensors.torch import load_file

            objective.load_state_dict({k: v.to(ctx.device) for k, v in load_file(str(saved)).items()})
    result = TrainResult(output_dir=out_dir, saved_to=None, steps=plan.total_steps, fisher_file=method.fisher_file,
                         peak_memory_scope=peak_memory_scope(ctx.device, memory_reset))
    checkpoints = ckpt.list_checkpoints(out_dir)
    result.last_checkpoint = checkpoints[-1] if checkpoints else None
    run = Run(cfg, ctx, out_dir, model, tokenizer, pad_id, method, params, optimizer, autocast, head, layout, kl,
              objective, data, plan, state, best_weights, MetricsLog(cfg, out_dir, state.step, ctx), result)

    t_loop = time.time()
    tokens = run_steps(run, on_step_end)
    result.wall_seconds = time.time() - t_start
    result.tokens_per_second = tokens / max(time.time() - t_loop, 1e-9)
    finish(run)
    D.barrier(ctx)
    D.teardown(ctx)
    return result


def _diverged_message(what: str, value: float, step: int, last: Path | None) -> str:
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (set save_steps to keep some)"
    return (f"{what} became {value} at step {step}; training stopped, {keep}. "
            "Try a lower learning_rate, a max_grad_norm, or bf16=false.")
