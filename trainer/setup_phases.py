"""The phases that set a run up, in the order :func:`trainer.loop.train` calls them: read the data,
load the model, self-replay, tokenize, prepare the method (and its Fisher), build the optimizer,
plan the batches, restore a checkpoint. Each is one function of the config and what the phases
before it built; the step loop itself lives in ``trainer/loop.py``.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from trainer import checkpoint as ckpt
from trainer import distributed as D
from trainer.config import SELF_REPLAY, ConfigError, TrainConfig
from trainer.data import (
    REPLAY,
    Example,
    TokenizedSet,
    collate,
    plan_batches,
    read_jsonl,
    split_validation,
    steps_for,
    tokenize_file,
)
from trainer.methods import Method, build_method, fisher_key, load_fisher_file


def log_main(text: str, ctx: D.DistContext) -> None:
    """A line above the progress bar, from rank 0 only."""
    if ctx.is_main:
        tqdm.write(text)


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
            path, _ = self_replay_from_config(cfg, model, tokenizer, log=lambda text: log_main(text, ctx))
        D.barrier(ctx)
    rows[str(path)] = read_jsonl(path)
    changes = {"replay_data": str(path)} if cfg.replay_data == SELF_REPLAY else {}
    if wants_fisher:
        changes["fisher_data"] = str(path)
        log_main(f"fisher: no general data given; estimated on the base model's own answers ({path})", ctx)
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
            log_main(f"data: {part.summary()}", ctx)
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
        log_main(f"fisher: {method.fisher_file}", ctx)
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
    global_batch = cfg.global_batch(ctx.world_size)
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
    log_main(f"resumed from {path} at step {state.step}", ctx)
    return state, ckpt.load_best(path)
