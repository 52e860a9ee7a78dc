"""Stop where forgetting starts: what each eval step measures besides the validation loss.

Two signals, both computed at the loop's eval steps (``eval_steps``) and logged in
``metrics.jsonl``:

* ``kl_to_base_val``: the data-free forgetting proxy, the mean per-token ``KL(base || tuned)``
  over the labelled positions of the task's validation rows (``eval_data``, or the split off
  ``data``). RL's Razor (Shenfeld et al. 2025, arXiv 2509.04259) finds forgetting tracks this KL
  measured on the new task's own inputs, so it needs no general data. The base side is the
  KL anchor's (``trainer.kl_anchor``) when the run has one; else for LoRA the same model with its
  adapters switched off (``kernels.lora_layers.lora_disabled``, no second copy of any weight),
  and for full fine-tuning a frozen copy of the base, taken only when ``max_kl_to_base`` asks
  for the proxy (it costs the weights twice in memory). The KL runs through
  ``kernels.linear_cross_entropy.linear_kl_divergence``: no ``[tokens, vocab]`` tensor.
  ``max_kl_to_base=X`` stops the run at the first eval step where it exceeds X and keeps the
  weights of the last eval step under the bound (the best one under the bound when early
  stopping is on too; the starting weights when even the first eval step is over).
* ``task_score_val`` (``early_stopping_metric=task``): the task's own score, the
  ``capability_task`` suite scored greedily on its first :data:`TASK_SCORE_ROWS` rows by the
  same function that scores it after training (``eval.capability.score_model``: chat suites
  under the chat template, their answer format and match rules as the report has them);
  early stopping then keeps the weights of the highest score (``early_stopping_patience``).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from trainer import distributed as D
from trainer.config import ConfigError, TrainConfig
from trainer.data import IGNORE_INDEX
from trainer.kl_anchor import eval_mode
from trainer.loss import final_hidden

__all__ = ["TASK_SCORE_ROWS", "EvalWatch", "KLProxy", "TaskScorer", "build_eval_watch", "check_stop_config",
           "start_eval_watch"]

# Rows of the task suite scored at each eval step (the first N; capability_limit caps it lower):
# enough to rank checkpoints, a few seconds of greedy decoding on a 135M model.
TASK_SCORE_ROWS = 50


def check_stop_config(cfg: TrainConfig) -> None:
    """The stop settings' needs that are known before any model loads (ConfigError: exit 2)."""
    if cfg.early_stopping_metric == "task" and not cfg.capability_task:
        raise ConfigError("early_stopping_metric=task needs capability_task (the task's suite, scored at each eval "
                          "step); set capability_task=FILE.jsonl or early_stopping_metric=loss")
    if cfg.max_kl_to_base is not None and not cfg.eval_steps:
        raise ConfigError(f"max_kl_to_base={cfg.max_kl_to_base} is checked at each eval step: set eval_steps=N "
                          "(N > 0), or max_kl_to_base=none")
    if cfg.early_stopping_metric == "task" and cfg.early_stopping_patience > 0 and not cfg.eval_steps:
        raise ConfigError("early_stopping_metric=task with early_stopping_patience needs eval_steps=N (N > 0)")


# ---------------------------------------------------------------------------- the KL proxy


@dataclass
class KLProxy:
    """``KL(base || tuned)`` summed over a batch's labelled positions, given the tuned model's
    final hidden states and head (the validation pass's own forward: one more forward, the
    base's, per batch)."""

    base_hidden: Callable[[dict], torch.Tensor]  # the base's final hidden states for a batch (no graph)
    base_head: nn.Linear | None  # None: the tuned model's own head (LoRA leaves the head alone)
    autocast: Callable
    source: str  # what the base side is, for the log

    @torch.no_grad()
    def kl_sum(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor, head: nn.Linear) -> torch.Tensor:
        from kernels.linear_cross_entropy import linear_kl_divergence

        d = hidden.shape[-1]
        idx = (batch["shift_labels"].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        h = hidden.reshape(-1, d).index_select(0, idx)
        base = self.base_hidden(batch).reshape(-1, d).index_select(0, idx)
        base_head = self.base_head if self.base_head is not None else head
        with self.autocast():
            # forward KL with the base as the "teacher": sum_v p_base (log p_base - log p_tuned)
            return linear_kl_divergence(h, head.weight, base, base_head.weight, kind="forward",
                                        bias_student=head.bias, bias_teacher=base_head.bias)


def lora_base_hidden(model: nn.Module, autocast: Callable) -> Callable[[dict], torch.Tensor]:
    """The base's hidden states from the LoRA model itself, its adapters switched off."""
    from kernels.lora_layers import lora_disabled

    def base_hidden(batch: dict) -> torch.Tensor:
        with torch.no_grad(), lora_disabled(model), eval_mode(model), autocast():
            return final_hidden(model, batch)[0]

    return base_hidden


def frozen_base(cfg: TrainConfig, model: nn.Module, at_start: bool, device: torch.device) -> nn.Module:
    """A frozen copy of the base: the model itself before its first step, else (a resumed run)
    the model directory read again."""
    if at_start:
        frozen = copy.deepcopy(D.unwrap(model))
    else:
        from trainer.loop import load_model

        frozen = load_model(cfg, device)[0]
    return frozen.requires_grad_(False).eval()


def build_kl_proxy(run, lora: bool) -> KLProxy | None:
    """The run's KL proxy, or None where it is not measured (see the module's docstring)."""
    cfg = run.cfg
    wanted = cfg.max_kl_to_base is not None
    why_not = None
    if run.data.val is None or not run.data.val.examples:
        why_not = "no validation rows (eval_data, or validation_split > 0)"
    elif not run.head.fused:
        why_not = f"the fused linear head is off ({run.head.reason})"
    if why_not:
        if wanted:
            raise ConfigError(f"max_kl_to_base needs the KL to the base on the validation rows: {why_not}")
        return None
    anchor = run.kl
    if anchor is not None and anchor.base_hidden is not None:  # the KL anchor already holds the base's side
        return KLProxy(anchor.base_hidden, anchor.base_head, run.autocast, "the kl_to_base anchor's base")
    if lora:
        return KLProxy(lora_base_hidden(run.model, run.autocast), None, run.autocast, "adapters off")
    if not wanted:  # full fine-tuning: a second copy of the weights only when asked for
        return None
    frozen = frozen_base(cfg, run.model, run.state.step == 0, run.ctx.device)
    autocast = run.autocast

    def base_hidden(batch: dict) -> torch.Tensor:
        with torch.no_grad(), autocast():
            return final_hidden(frozen, batch)[0]

    return KLProxy(base_hidden, frozen.get_output_embeddings(), autocast, "a frozen copy of the base")


# ---------------------------------------------------------------------------- the task score


@dataclass
class TaskScorer:
    """The task suite's first rows, scored greedily as the end-of-run report scores them."""

    suite: object  # eval.suite.Suite, cut to the rows scored
    tokenizer: object

    def score(self, model: nn.Module, ctx: D.DistContext) -> float:
        """Accuracy in percent (0-100) of ``model`` on the rows; rank 0 scores, every rank gets it."""
        value = torch.zeros(1, dtype=torch.float64, device=ctx.device)
        if ctx.is_main:
            value[0] = score_task(D.unwrap(model), self.tokenizer, self.suite)
        return float(D.all_reduce_sum(value, ctx)[0])


def score_task(model: nn.Module, tokenizer, suite) -> float:
    """``eval.capability.score_model`` on ``suite`` (greedy, the report's settings), in eval mode."""
    from eval.capability import score_model

    with eval_mode(model), torch.no_grad():
        return score_model(model, tokenizer, suite).overall_accuracy


def build_task_scorer(cfg: TrainConfig, tokenizer) -> TaskScorer:
    from eval.chat import require_chat_template
    from eval.suite import SuiteError, load_suite

    try:
        suite = load_suite(cfg.capability_task)
    except SuiteError as e:
        raise ConfigError(f"capability_task: {e}") from None
    limit = min(TASK_SCORE_ROWS, cfg.capability_limit or TASK_SCORE_ROWS)
    suite = replace(suite, rows=suite.rows[:limit])
    if not suite.rows:
        raise ConfigError(f"capability_task={cfg.capability_task}: no rows to score for early_stopping_metric=task")
    if any(row.chat if row.chat is not None else suite.meta.chat for row in suite.rows):
        try:
            require_chat_template(tokenizer, f"{cfg.capability_task} asks for the chat template")
        except SuiteError as e:
            raise ConfigError(f"early_stopping_metric=task: {e}") from None
    return TaskScorer(suite, tokenizer)


# ---------------------------------------------------------------------------- what the loop holds


@dataclass
class EvalWatch:
    """The eval steps' extra signals for one run, and whether the KL bound has been crossed."""

    kl: KLProxy | None = None
    task: TaskScorer | None = None
    max_kl: float | None = None
    exceeded_at: int | None = None  # the eval step whose KL crossed max_kl (the run stops there)

    def over_bound(self, kl: float | None) -> bool:
        return self.max_kl is not None and kl is not None and kl > self.max_kl


def build_eval_watch(run, lora: bool) -> EvalWatch:
    """What the run's eval steps measure besides the loss (called before the first step)."""
    cfg = run.cfg
    check_stop_config(cfg)
    if D.is_fsdp(run.model) and cfg.early_stopping_metric == "task":
        raise ConfigError("early_stopping_metric=task generates text with the whole model; FSDP shards it "
                          "(use DDP, fsdp=false, or early_stopping_metric=loss)")
    watch = EvalWatch(max_kl=cfg.max_kl_to_base)
    watch.kl = build_kl_proxy(run, lora)
    if cfg.early_stopping_metric == "task":
        if run.data.val is None or not run.data.val.examples:
            raise ConfigError("early_stopping_metric=task scores the task at the eval steps, which run on validation "
                              "rows: set eval_data=FILE.jsonl or validation_split > 0")
        watch.task = build_task_scorer(cfg, run.tokenizer)
    return watch


def start_eval_watch(run, lora: bool, log: Callable[[str], None]) -> EvalWatch:
    """:func:`build_eval_watch` before the first step, and under ``max_kl_to_base`` the starting
    weights kept as ``run.best_weights`` (what a stop keeps if even the first eval step is over)."""
    watch = build_eval_watch(run, lora)
    if watch.kl is not None:
        log(f"forgetting proxy: KL(base || tuned) on the validation rows at each eval step (base: {watch.kl.source})")
    if watch.max_kl is not None and run.best_weights is None:
        run.best_weights = D.full_state_dict(run.model, trainable_only=True)
        run.state.kl_safe_step = run.state.step
    return watch
