"""The training loop, top to bottom: load, prepare the method, plan the batches, step, save.

One optimizer step = one global batch of ``per_device_train_batch_size * gradient_accumulation_steps
* world_size`` rows, taken from the run's batch plan (``trainer.data.plan_batches``). The loss of
the step is the sum of token losses over the whole global batch divided by its count of
labelled tokens, so accumulation and the number of processes change nothing but speed.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from trainer import checkpoint as ckpt
from trainer import distributed as D
from trainer.config import ConfigError, TrainConfig, save_yaml
from trainer.data import (
    IGNORE_INDEX,
    REPLAY,
    Example,
    collate,
    count_loss_tokens,
    micro_batches,
    pad_id_of,
    plan_batches,
    read_jsonl,
    split_validation,
    steps_for,
    tokenize_file,
)
from trainer.methods import Method, build_method, fisher_key, load_fisher_file


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
    task_rows: int = 0
    replay_rows: int = 0
    fisher_file: Path | None = None
    last_checkpoint: Path | None = None

    def summary(self) -> str:
        share = self.replay_rows / max(1, self.task_rows + self.replay_rows)
        lines = [
            f"done: {self.steps} steps in {self.wall_seconds:.1f} s, {self.tokens_per_second:,.0f} tokens/s, "
            f"peak memory {self.peak_memory_mb:,.0f} MB",
            f"  rows trained: {self.task_rows} task + {self.replay_rows} replay (replay share {share:.3f})",
        ]
        if self.losses:
            last = max(self.losses)
            lines.append(f"  final train loss {self.losses[last]:.4f} (step {last})")
        if self.eval_losses:
            best = self.best_step if self.best_step is not None else max(self.eval_losses)
            lines.append(f"  best validation loss {self.eval_losses[best]:.4f} at step {best}"
                         + (" (stopped early, best weights restored)" if self.stopped_early else ""))
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


def load_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, object]:
    """Model and tokenizer from a local HF directory; weights only from safetensors files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.model)
    if not path.is_dir():
        raise ConfigError(f"model={cfg.model}: not a directory (give a local Hugging Face model directory)")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"model={cfg.model}: no *.safetensors weights; forgetless loads weights only from "
                          "safetensors (convert with `model.save_pretrained(dir, safe_serialization=True)`)")
    model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, dtype=torch.float32,
                                                 trust_remote_code=cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or str(path), trust_remote_code=cfg.trust_remote_code)
    return model.to(device), tokenizer


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], autocast) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the labelled tokens of ``batch``."""
    with autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def validation_loss(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int,
                    ctx: D.DistContext, autocast) -> float:
    """Mean token loss over ``examples``, sharded over ranks (every rank runs the same batch count)."""
    was_training = model.training
    model.eval()
    shard = examples[ctx.rank::ctx.world_size]
    per_rank = math.ceil(len(examples) / ctx.world_size)
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for start in range(0, per_rank, batch_size):
        rows = shard[start:start + batch_size]
        weight = 1.0 if rows else 0.0  # an empty shard still joins FSDP's collectives
        batch = {k: v.to(ctx.device) for k, v in collate(rows or examples[:1], pad_id).items()}
        totals[0] += weight * token_loss_sum(model, batch, autocast).double()
        totals[1] += weight * count_loss_tokens(batch)
    D.all_reduce_sum(totals, ctx)
    model.train(was_training)
    return float(totals[0] / totals[1])


def make_fisher_source(cfg: TrainConfig, fisher_rows: list[Example], pad_id: int, ctx: D.DistContext):
    """A callable that estimates the Fisher of a model on ``fisher_rows``, sharded over ranks."""

    def estimate(model: nn.Module) -> dict[str, torch.Tensor]:
        from trainer.fisher import estimate_fisher

        mine = fisher_rows[ctx.rank::ctx.world_size]
        bs = cfg.per_device_eval_batch_size
        batches = [{k: v.to(ctx.device) for k, v in collate(mine[i:i + bs], pad_id).items()}
                   for i in range(0, len(mine), bs)]
        fisher = estimate_fisher(model, batches, kind=cfg.fisher_kind, seed=cfg.seed + ctx.rank,
                                 progress=cfg.progress and ctx.is_main)
        fisher = D.reduce_fisher(fisher, len(mine), ctx)
        if cfg.previous_fisher:  # online EWC: F = gamma * F_old + F_new
            from kernels.ewc import online_update

            old, _ = load_fisher_file(cfg.previous_fisher)
            old = {k: v.to(ctx.device) for k, v in old.items() if k in fisher}
            online_update(old, {k: fisher[k] for k in old}, cfg.ewc_online_gamma)
            fisher.update(old)
        return fisher

    return estimate


def _log(text: str, ctx: D.DistContext) -> None:
    if ctx.is_main:
        tqdm.write(text)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(cfg: TrainConfig, on_step_end: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run one training job as ``cfg`` says (paths already resolved, see ``trainer.run``)."""
    t_start = time.time()
    ctx = D.setup(cfg.device)
    out_dir = Path(cfg.output_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    use_bf16 = cfg.bf16 == "true" or (cfg.bf16 == "auto" and ctx.device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
    autocast = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    # -- data (checked before the model loads, so bad rows fail fast), then the model ----------
    fisher_path = (cfg.fisher_data or cfg.replay_data) if cfg.method in ("ewc", "lora_ewc") else None
    if cfg.method in ("ewc", "lora_ewc") and not fisher_path and not cfg.fisher_path:
        raise ConfigError(f"method={cfg.method} needs fisher_data (or replay_data) for the Fisher")
    wanted = [cfg.data, cfg.eval_data, cfg.replay_data if cfg.replay_ratio > 0 else None, fisher_path]
    rows = {path: read_jsonl(path) for path in dict.fromkeys(p for p in wanted if p)}
    model, tokenizer = load_model(cfg, ctx.device)
    pad_id = pad_id_of(tokenizer)
    task = tokenize_file(cfg.data, tokenizer, cfg.max_length, rows[cfg.data])
    val = tokenize_file(cfg.eval_data, tokenizer, cfg.max_length, rows[cfg.eval_data]) if cfg.eval_data else None
    if val is None:
        task, val = split_validation(task, cfg.validation_split, cfg.seed)
    replay = None
    if cfg.replay_ratio > 0:
        replay = tokenize_file(cfg.replay_data, tokenizer, cfg.max_length, rows[cfg.replay_data])
    for part in (task, val, replay):
        if part is not None:
            _log(f"data: {part.summary()}", ctx)

    # -- the method: Fisher on the base model, then what trains --------------------------------
    method: Method = build_method(cfg)
    fisher_source = fisher_cache = None
    if method.penalty is not None and fisher_path:
        fisher_set = tokenize_file(fisher_path, tokenizer, cfg.max_length, rows[fisher_path])
        fisher_rows = list(fisher_set.examples)
        random.Random(f"fisher-{cfg.seed}").shuffle(fisher_rows)
        fisher_source = make_fisher_source(cfg, fisher_rows[:cfg.fisher_samples], pad_id, ctx)

    if method.penalty is not None:
        def fisher_cache(model_: nn.Module, names: list[str]) -> Path:
            if cfg.fisher_path:
                if not Path(cfg.fisher_path).is_file():
                    raise ConfigError(f"fisher_path={cfg.fisher_path}: file not found")
                return Path(cfg.fisher_path)
            return out_dir / f"fisher-{fisher_key(model_, fisher_path, names, cfg)}.safetensors"

    method.prepare(model, fisher_source, fisher_cache)
    if method.fisher_file is not None:
        _log(f"fisher: {method.fisher_file}", ctx)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model = D.wrap_model(model, ctx, cfg.fsdp)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    _log(f"method: {cfg.method}; {n_trainable:,} of {n_total:,} parameters train; world size {ctx.world_size}; "
         f"device {ctx.device}{' (bf16 autocast)' if use_bf16 else ''}", ctx)

    # Weight decay on matrices only (not on biases, norms or the 1-D parts of anything).
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
    )

    # -- the batch plan --------------------------------------------------------------------
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * ctx.world_size
    n_replay = len(replay.examples) if replay else 0
    ratio = cfg.replay_ratio if replay else 0.0
    total_steps = steps_for(len(task.examples), global_batch, ratio, cfg.num_train_epochs, cfg.max_steps)
    plan = plan_batches(len(task.examples), n_replay, ratio, global_batch, total_steps, cfg.seed)
    sources = {0: task.examples, REPLAY: replay.examples if replay else []}

    # -- resume -----------------------------------------------------------------------------
    state = ckpt.TrainerState(step=0)
    best_weights: dict[str, torch.Tensor] | None = None
    if cfg.resume_from_checkpoint:
        path = ckpt.resolve_resume(cfg.resume_from_checkpoint, out_dir)
        weights, optim_state, state, rng = ckpt.load_checkpoint(path)
        D.load_trainable(model, weights)
        D.load_optimizer_state(model, optimizer, optim_state)
        ckpt.set_rng_state(rng)
        best_weights = ckpt.load_best(path)
        _log(f"resumed from {path} at step {state.step}", ctx)
    metrics_path = out_dir / "metrics.jsonl"
    if ctx.is_main:
        kept = []
        if state.step and metrics_path.exists():  # drop records past the resume point
            kept = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= state.step]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
    writer = None
    if cfg.report_to == "tensorboard" and ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log_metrics(record: dict) -> None:
        if not ctx.is_main:
            return
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, record["step"])

    def save(rng: dict | None = None) -> Path | None:
        weights = D.full_state_dict(model, trainable_only=True)
        optim_state = D.optimizer_state(model, optimizer)
        path = None
        if ctx.is_main:
            path = ckpt.save_checkpoint(out_dir, weights, optim_state, state, cfg.save_total_limit,
                                        rng=rng, best=best_weights)
        D.barrier(ctx)
        return path

    # -- the loop ---------------------------------------------------------------------------
    result = TrainResult(output_dir=out_dir, saved_to=None, steps=total_steps, fisher_file=method.fisher_file)
    result.last_checkpoint = ckpt.list_checkpoints(out_dir)[-1] if ckpt.list_checkpoints(out_dir) else None
    bar = tqdm(total=total_steps, initial=state.step, disable=not (cfg.progress and ctx.is_main),
               dynamic_ncols=True, desc=f"{cfg.method}")
    t_loop, tokens_this_run = time.time(), 0
    step_rng = ckpt.rng_state()
    try:
        while state.step < total_steps:
            step = state.step
            t0 = time.time()
            lr = lr_at(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = plan[step]
            n_replay_rows = sum(1 for kind, _ in rows if kind == REPLAY)
            micros = micro_batches(rows, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                                   ctx.rank, ctx.world_size)
            batches = [{k: v.to(ctx.device) for k, v in collate([sources[s][i] for s, i in mb], pad_id).items()}
                       for mb in micros]
            # Normalise by the labelled tokens of the whole global batch (all micro-batches, all ranks).
            counts = torch.tensor([sum(count_loss_tokens(b) for b in batches),
                                   sum(int(b["attention_mask"].sum()) for b in batches)],
                                  dtype=torch.float64, device=ctx.device)
            D.all_reduce_sum(counts, ctx)
            n_loss_tokens, n_tokens = float(counts[0]), int(counts[1])
            loss_total = torch.zeros((), dtype=torch.float64, device=ctx.device)
            for i, batch in enumerate(batches):
                with D.no_sync(model, skip_sync=i < len(batches) - 1):
                    loss_sum = token_loss_sum(model, batch, autocast)
                    # DDP averages gradients over ranks, hence the world_size factor.
                    (loss_sum * (ctx.world_size / max(n_loss_tokens, 1.0))).backward()
                loss_total += loss_sum.detach().double()
            loss = float(D.all_reduce_sum(loss_total, ctx)) / max(n_loss_tokens, 1.0)
            if not math.isfinite(loss):
                raise TrainingDiverged(_diverged_message("loss", loss, step + 1, result.last_checkpoint))
            penalty = method.after_backward(model)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(_diverged_message("gradient norm", grad_norm, step + 1, result.last_checkpoint))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step = step + 1
            state.tokens_seen += n_tokens
            tokens_this_run += n_tokens
            state.replay_rows += n_replay_rows
            state.task_rows += len(rows) - n_replay_rows
            dt = max(time.time() - t0, 1e-9)
            result.losses[state.step] = loss
            record = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_second": n_tokens / dt, "ewc_penalty": penalty,
                      "replay_share": n_replay_rows / len(rows)}

            if val is not None and ((cfg.eval_steps and state.step % cfg.eval_steps == 0)
                                    or state.step == total_steps):
                eval_loss = validation_loss(model, val.examples, cfg.per_device_eval_batch_size, pad_id, ctx,
                                            autocast)
                record["eval_loss"] = eval_loss
                result.eval_losses[state.step] = eval_loss
                if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
                    state.best_eval_loss, state.best_step, state.evals_without_improvement = eval_loss, state.step, 0
                    if cfg.early_stopping_patience > 0:
                        best_weights = D.full_state_dict(model, trainable_only=True)
                else:
                    state.evals_without_improvement += 1
                _log(f"step {state.step}: eval loss {eval_loss:.4f} (best {state.best_eval_loss:.4f} "
                     f"at step {state.best_step})", ctx)

            if state.step % cfg.logging_steps == 0 or state.step == total_steps or "eval_loss" in record:
                log_metrics(record)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:,.0f}")
            bar.update(1)
            if cfg.save_steps and state.step % cfg.save_steps == 0:
                result.last_checkpoint = save()
            step_rng = ckpt.rng_state()  # the RNG as of state.step: what an interrupt checkpoint restores
            if on_step_end is not None:
                on_step_end(state.step, record)
            if 0 < cfg.early_stopping_patience <= state.evals_without_improvement:
                _log(f"early stopping at step {state.step}: no improvement in {cfg.early_stopping_patience} "
                     f"evaluations", ctx)
                result.stopped_early = True
                break
    except KeyboardInterrupt:
        bar.close()
        # The step in flight (if any) is dropped; the checkpoint holds the last completed one and
        # the RNG as it was when that step ended, so a resume replays the very same run.
        state_before = state.step
        result.last_checkpoint = save(rng=step_rng)
        _log(f"interrupted at step {state_before}: checkpoint saved to {result.last_checkpoint}; "
             f"continue with resume_from_checkpoint=latest", ctx)
        D.teardown(ctx)
        raise
    bar.close()
    result.wall_seconds = time.time() - t_start
    result.tokens_per_second = tokens_this_run / max(time.time() - t_loop, 1e-9)

    # -- the end: best weights back, outputs out ----------------------------------------------
    if cfg.early_stopping_patience > 0 and best_weights is not None and state.best_step != state.step:
        D.load_trainable(model, best_weights)
        _log(f"restored the best weights (step {state.best_step}, eval loss {state.best_eval_loss:.4f})", ctx)
    result.best_step = state.best_step
    result.task_rows, result.replay_rows = state.task_rows, state.replay_rows  # the whole run, resumes included
    full_state = D.full_state_dict(model, trainable_only=False) if D.is_fsdp(model) else None
    if ctx.is_main:
        result.saved_to = method.save(D.unwrap(model), tokenizer, out_dir, state_dict=full_state)
    result.peak_memory_mb = peak_memory_mb(ctx.device)
    if writer is not None:
        writer.close()
    D.barrier(ctx)
    D.teardown(ctx)
    return result


def _diverged_message(what: str, value: float, step: int, last: Path | None) -> str:
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (set save_steps to keep some)"
    return (f"{what} became {value} at step {step}; training stopped, {keep}. "
            "Try a lower learning_rate, a max_grad_norm, or bf16=false.")
