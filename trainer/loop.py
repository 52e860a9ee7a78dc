"""The training loop, top to bottom: load, prepare the method, plan the batches, step, save.

One optimizer step = one global batch of ``per_device_train_batch_size * gradient_accumulation_steps
* world_size`` rows, taken from the run's batch plan (``trainer.data.plan_batches``). The loss of
the step is the sum of token losses over the whole global batch divided by its count of
labelled tokens, so accumulation and the number of processes change nothing but speed.

:func:`train` reads as the list of its phases; each phase is one function below it (torchtune's
setup/train split): ``read_data`` -> ``load_model`` -> ``self_replay`` -> ``tokenize_data`` -> ``prepare_method``
-> ``build_optimizer`` -> ``plan_run`` -> ``restore`` -> the step loop (``train_step``,
``validate``) -> ``finish``. A new part of a run is one new function and one line in ``train``.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from trainer import checkpoint as ckpt
from trainer import distributed as D
from trainer.config import SELF_REPLAY, ConfigError, TrainConfig, save_yaml
from trainer.data import (
    REPLAY,
    Example,
    TokenizedSet,
    collate,
    count_input_tokens,
    count_loss_tokens,
    group_by_length,
    micro_batches,
    pad_id_of,
    plan_batches,
    read_jsonl,
    split_validation,
    steps_for,
    tokenize_file,
)
from trainer.kl_anchor import KLAnchor, build_kl_anchor
from trainer.loss import Head, choose_head, to_device, validation_loss
from trainer.memory import peak_memory_mb, peak_memory_scope, reset_peak_memory
from trainer.methods import LoRAWeights, Method, build_method, fisher_key, load_fisher_file
from trainer.packing import BatchLayout, build_batch, resolve_layout

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


def _log(text: str, ctx: D.DistContext) -> None:
    if ctx.is_main:
        tqdm.write(text)


# ---------------------------------------------------------------------------- the phases


def bf16_autocast(cfg: TrainConfig, device: torch.device, model: nn.Module) -> tuple[bool, Callable]:
    """Whether the run uses bf16 autocast, and a context-manager factory for its forwards.

    ``auto`` turns it on where bf16 matmuls are native: CUDA devices that support bf16, and
    CPUs with AVX512_BF16 or AMX-BF16 (``kernels.backend.cpu_has_native_bf16`` reads the CPU's
    flags; without them bf16 is emulated and slower than fp32) for models of at least
    ``SMALL_MODEL_PARAMS`` parameters: below that a CPU matmul takes microseconds and the casts
    autocast adds cost more than bf16 saves (and the demo's numbers stay the fp32 ones).
    Master weights, optimizer state, the loss reduction and the Fisher stay fp32 either way."""
    from kernels.backend import SMALL_MODEL_PARAMS, cpu_has_native_bf16

    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = cpu_has_native_bf16() and sum(p.numel() for p in model.parameters()) >= SMALL_MODEL_PARAMS
    use_bf16 = cfg.bf16 == "true" or (cfg.bf16 == "auto" and native)
    if not use_bf16:
        return False, contextlib.nullcontext
    return True, lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def fisher_data_path(cfg: TrainConfig) -> str | None:
    """The general data the method's Fisher is estimated on (None when the method has no penalty)."""
    if cfg.method not in ("ewc", "lora_ewc") or cfg.fisher_path:
        return None
    # With no general data at all, the base's own answers (self-replay) stand in for it.
    return cfg.fisher_data or cfg.replay_data or SELF_REPLAY


def read_data(cfg: TrainConfig) -> dict[str, list[dict]]:
    """Every JSONL file the run reads, checked row by row before the model loads (bad rows fail fast)."""
    wanted = [cfg.data, cfg.eval_data, cfg.replay_data if cfg.replay_ratio > 0 else None, fisher_data_path(cfg)]
    return {path: read_jsonl(path) for path in dict.fromkeys(p for p in wanted if p and p != SELF_REPLAY)}


def self_replay(cfg: TrainConfig, model: nn.Module, tokenizer, rows: dict[str, list[dict]],
                ctx: D.DistContext) -> TrainConfig:
    """``replay_data=self`` (or a penalty with no general data): the base model answers the prompt
    bank (``trainer.self_replay``, cached), and its chats become the replay and Fisher data.
    Returns the config with that file in place of ``self``; ``rows`` gains its rows."""
    wants_replay = cfg.replay_data == SELF_REPLAY and cfg.replay_ratio > 0
    wants_fisher = fisher_data_path(cfg) == SELF_REPLAY
    if not (wants_replay or wants_fisher):
        return cfg
    from trainer.self_replay import self_replay_from_config

    for turn in (0, 1):  # rank 0 generates (and fills the cache); the others then read the cache
        if (turn == 0) == ctx.is_main:
            path, _ = self_replay_from_config(cfg, model, tokenizer, log=lambda text: _log(text, ctx))
        D.barrier(ctx)
    rows[str(path)] = read_jsonl(path)
    changes = {"replay_data": str(path)} if cfg.replay_data == SELF_REPLAY else {}
    if wants_fisher:
        changes["fisher_data"] = str(path)
        _log(f"fisher: no general data given; estimated on the base model's own answers ({path})", ctx)
    return replace(cfg, **changes)


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


@dataclass
class RunData:
    """The tokenized sets of one run."""

    task: TokenizedSet
    val: TokenizedSet | None
    replay: TokenizedSet | None


def tokenize_data(cfg: TrainConfig, tokenizer, rows: dict[str, list[dict]], ctx: D.DistContext) -> RunData:
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
    return RunData(task, val, replay)


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


def prepare_method(cfg: TrainConfig, model: nn.Module, tokenizer, rows: dict[str, list[dict]], pad_id: int,
                   out_dir: Path, ctx: D.DistContext) -> Method:
    """The method's parts on the model: the base Fisher (estimated or reused) first, then what trains."""
    method = build_method(cfg)
    fisher_path = fisher_data_path(cfg)
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
    return method


def build_optimizer(cfg: TrainConfig, params: list[nn.Parameter], method: Method,
                    sharded: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, norms or other 1-D parameters).

    With EWC (and unsharded parameters) it is ``AdamWEWC``: the same AdamW step with the
    penalty's ``lam F (p - p*)`` folded into the one pass over the weights."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    hyper = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    fold = getattr(method.penalty, "fold_into", None)
    if fold is not None and not sharded:
        from kernels.adamw_ewc import AdamWEWC

        return fold(lambda lam, anchors, fishers: AdamWEWC(groups, lam, anchors, fishers, **hyper))
    # torch's fused AdamW (one kernel over all tensors; about 2.5x its default CPU step here, and
    # what AdamWEWC runs too, so ewc and full compare like for like); DTensors keep the default.
    return torch.optim.AdamW(groups, **hyper, fused=not sharded)


@dataclass
class BatchPlan:
    """The whole run's global batches, as (source, row index), and the rows they index."""

    total_steps: int
    batches: list[list[tuple[int, int]]]
    sources: dict[int, list[Example]]


def plan_run(cfg: TrainConfig, data: RunData, ctx: D.DistContext) -> BatchPlan:
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * ctx.world_size
    n_replay = len(data.replay.examples) if data.replay else 0
    ratio = cfg.replay_ratio if data.replay else 0.0
    total = steps_for(len(data.task.examples), global_batch, ratio, cfg.num_train_epochs, cfg.max_steps)
    batches = plan_batches(len(data.task.examples), n_replay, ratio, global_batch, total, cfg.seed)
    return BatchPlan(total, batches, {0: data.task.examples, REPLAY: data.replay.examples if data.replay else []})


def restore(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, out_dir: Path,
            ctx: D.DistContext) -> tuple[ckpt.TrainerState, dict[str, torch.Tensor] | None]:
    """The trainer state to start from: step 0, or what ``resume_from_checkpoint`` saved."""
    if not cfg.resume_from_checkpoint:
        return ckpt.TrainerState(step=0), None
    path = ckpt.resolve_resume(cfg.resume_from_checkpoint, out_dir)
    weights, optim_state, state, rng = ckpt.load_checkpoint(path)
    D.load_trainable(model, weights)
    D.load_optimizer_state(model, optimizer, optim_state)
    ckpt.set_rng_state(rng)
    _log(f"resumed from {path} at step {state.step}", ctx)
    return state, ckpt.load_best(path)


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
    data: RunData
    plan: BatchPlan
    state: ckpt.TrainerState
    best_weights: dict[str, torch.Tensor] | None
    metrics: MetricsLog
    result: TrainResult

    def save_checkpoint(self, rng: dict | None = None) -> Path | None:
        weights = D.full_state_dict(self.model, trainable_only=True)
        optim_state = D.optimizer_state(self.model, self.optimizer)
        path = None
        if self.ctx.is_main:
            path = ckpt.save_checkpoint(self.out_dir, weights, optim_state, self.state, self.cfg.save_total_limit,
                                        rng=rng, best=self.best_weights)
        D.barrier(self.ctx)
        return path


# ------------------------------------------------------------------------- one step


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
    batches = [to_device(build_batch([run.plan.sources[s][i] for s, i in mb], run.pad_id, run.layout.packing),
                         ctx.device) for mb in micros]
    # Normalise by the labelled tokens of the whole global batch (all micro-batches, all ranks).
    counts = torch.tensor([sum(count_loss_tokens(b) for b in batches), sum(count_input_tokens(b) for b in batches)],
                          dtype=torch.float64, device=ctx.device)
    D.all_reduce_sum(counts, ctx)
    n_loss_tokens, n_tokens = float(counts[0]), int(counts[1])
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss, KL to the base
    for i, (micro, batch) in enumerate(zip(micros, batches, strict=True)):
        with D.no_sync(model, skip_sync=i < len(batches) - 1):
            loss_sum, hidden, head = run.head.forward(model, batch, run.autocast)
            objective = loss_sum
            if run.kl is not None:
                kl_sum = run.kl.term(batch, micro, hidden, head, run.autocast)
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
    run.state.step = step + 1
    run.state.tokens_seen += n_tokens
    run.state.replay_rows += n_replay_rows
    run.state.task_rows += len(rows) - n_replay_rows
    dt = max(time.time() - t0, 1e-9)
    run.result.losses[run.state.step] = loss
    return {"step": run.state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_second": n_tokens / dt, "ewc_penalty": penalty,
            "replay_share": n_replay_rows / len(rows), "tokens": n_tokens,
            **({"kl_to_base": float(totals[1]) / max(n_loss_tokens, 1.0)} if run.kl is not None else {})}


def validate(run: Run, record: dict) -> None:
    """Validation loss at eval_steps and at the end; tracks the best step (and its weights for
    early stopping)."""
    cfg, state = run.cfg, run.state
    if run.data.val is None or not ((cfg.eval_steps and state.step % cfg.eval_steps == 0)
                                    or state.step == run.plan.total_steps):
        return
    eval_loss = validation_loss(run.model, run.data.val.examples, cfg.per_device_eval_batch_size, run.pad_id,
                                run.ctx, run.autocast, run.head, run.layout.packing)
    record["eval_loss"] = eval_loss
    run.result.eval_losses[state.step] = eval_loss
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
        state.best_eval_loss, state.best_step, state.evals_without_improvement = eval_loss, state.step, 0
        if cfg.early_stopping_patience > 0:
            run.best_weights = D.full_state_dict(run.model, trainable_only=True)
    else:
        state.evals_without_improvement += 1
    _log(f"step {state.step}: eval loss {eval_loss:.4f} (best {state.best_eval_loss:.4f} "
         f"at step {state.best_step})", run.ctx)


def run_steps(run: Run, on_step_end: Callable[[int, dict], None] | None) -> int:
    """The step loop; returns the tokens trained in this process's run (for tokens/s).

    On Ctrl-C the step in flight (if any) is dropped; the checkpoint holds the last completed
    one and the RNG as it was when that step ended, so a resume replays the very same run."""
    cfg, state = run.cfg, run.state
    bar = tqdm(total=run.plan.total_steps, initial=state.step, disable=not (cfg.progress and run.ctx.is_main),
               dynamic_ncols=True, desc=f"{cfg.method}")
    tokens = 0
    step_rng = ckpt.rng_state()
    try:
        while state.step < run.plan.total_steps:
            record = train_step(run, state.step)
            tokens += record.pop("tokens")
            validate(run, record)
            if state.step % cfg.logging_steps == 0 or state.step == run.plan.total_steps or "eval_loss" in record:
                run.metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_second']:,.0f}")
            bar.update(1)
            if cfg.save_steps and state.step % cfg.save_steps == 0:
                run.result.last_checkpoint = run.save_checkpoint()
            step_rng = ckpt.rng_state()  # the RNG as of state.step: what an interrupt checkpoint restores
            if on_step_end is not None:
                on_step_end(state.step, record)
            if 0 < cfg.early_stopping_patience <= state.evals_without_improvement:
                _log(f"early stopping at step {state.step}: no improvement in {cfg.early_stopping_patience} "
                     f"evaluations", run.ctx)
                run.result.stopped_early = True
                break
    except KeyboardInterrupt:
        bar.close()
        state_before = state.step
        run.result.last_checkpoint = run.save_checkpoint(rng=step_rng)
        _log(f"interrupted at step {state_before}: checkpoint saved to {run.result.last_checkpoint}; "
             f"continue with resume_from_checkpoint=latest", run.ctx)
        D.teardown(run.ctx)
        raise
    bar.close()
    return tokens


def finish(run: Run) -> None:
    """Best weights back (early stopping), then the method saves the model or adapter."""
    cfg, state, ctx = run.cfg, run.state, run.ctx
    if cfg.early_stopping_patience > 0 and run.best_weights is not None and state.best_step != state.step:
        D.load_trainable(run.model, run.best_weights)
        _log(f"restored the best weights (step {state.best_step}, eval loss {state.best_eval_loss:.4f})", ctx)
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
    # Not under gradient checkpointing, which recomputes whole layers: the remade-h note would
    # keep gate(x) and up(x) alive past the checkpoint that meant to drop them.
    if cfg.recompute_mlp and not cfg.gradient_checkpointing:
        from kernels.gated_mlp import recompute_mlp_activations

        mlps = recompute_mlp_activations(model)
        _log(f"memory: {mlps} gated MLPs keep only gate(x) and up(x) for backward" if mlps else
             "memory: no gated MLP recognised; recompute_mlp changes nothing for this model", ctx)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head = choose_head(model, data.task.examples[0], pad_id, ctx.device, cfg.fused_head,
                       sharded=cfg.fsdp and ctx.enabled)
    if not head.fused:
        _log(f"loss: the model's own logits ({head.reason})", ctx)
    layout = resolve_layout(cfg.packing, cfg.group_by_length, model)
    plan = plan_run(cfg, data, ctx)
    kl = build_kl_anchor(cfg, model, isinstance(method.weights, LoRAWeights), head.fused, plan.sources,
                         {key for batch in plan.batches for key in batch}, pad_id, ctx.device, autocast,
                         cfg.progress and ctx.is_main)
    _log(f"batches: {layout.reason}", ctx)
    model.train()
    model = D.wrap_model(model, ctx, cfg.fsdp)
    params = [p for p in model.parameters() if p.requires_grad]
    _log(f"method: {cfg.method}; {sum(p.numel() for p in params):,} of "
         f"{sum(p.numel() for p in model.parameters()):,} parameters train; world size {ctx.world_size}; "
         f"device {ctx.device}; precision {'bf16 autocast' if use_bf16 else 'fp32'}", ctx)
    optimizer = build_optimizer(cfg, params, method, sharded=D.is_fsdp(model))
    state, best_weights = restore(cfg, model, optimizer, out_dir, ctx)
    result = TrainResult(output_dir=out_dir, saved_to=None, steps=plan.total_steps, fisher_file=method.fisher_file,
                         peak_memory_scope=peak_memory_scope(ctx.device, memory_reset))
    checkpoints = ckpt.list_checkpoints(out_dir)
    result.last_checkpoint = checkpoints[-1] if checkpoints else None
    run = Run(cfg, ctx, out_dir, model, tokenizer, pad_id, method, params, optimizer, autocast, head, layout, kl, data, plan,
              state, best_weights, MetricsLog(cfg, out_dir, state.step, ctx), result)

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
