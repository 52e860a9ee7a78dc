"""``kl_to_base=BETA``: a token-level KL between the base model's and the trained model's
next-token distributions, added to the loss on the chosen rows (``kl_on``).

Why: forgetting tracks how far the tuned model's distribution moves from the base's on the
new task's own inputs (Shenfeld et al. 2025, "RL's Razor"; ASFT adds such a term to SFT), and
the base is the one source of general behaviour a user always has. ``kl_kind=forward`` is
``KL(base || tuned)`` (mass-covering: the tuned model keeps every answer the base would give);
``reverse`` is ``KL(tuned || base)``.

Where the base's distribution comes from, never a second ``[tokens, vocab]`` in memory (the
KL goes through ``kernels.linear_cross_entropy``, chunk by chunk, like the loss):

* **LoRA**: the same model with its adapters switched off (``kernels.lora_layers.lora_disabled``),
  one extra forward without a graph: no second copy of any weight;
* **full fine-tuning**: a frozen copy of the base taken before training (the weights twice in
  memory), or with ``kl_cache=true`` the base's top-``kl_topk`` log-probabilities at every
  labelled position of every row the run will train on, computed once before the first step
  and kept (then no copy: see ``linear_kl_from_topk`` for the tail-bucket approximation).

The sum runs over the labelled positions (the tokens the task loss is on) of the chosen rows,
and the loop divides it by the same token count as the loss, so ``BETA`` weighs one token's
KL against one token's cross-entropy.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from trainer.config import ConfigError, TrainConfig
from trainer.data import IGNORE_INDEX, REPLAY, TASK, Example
from trainer.loss import final_hidden, to_device
from trainer.packing import build_batch

KL_ON = ("task", "replay", "all")


def example_spans(batch: dict[str, torch.Tensor], n_examples: int) -> list[tuple[int, int]]:
    """(first flat position, length) of each example of a micro-batch, in the order the batch was
    built from: row i of a padded batch, its ``row_spans`` entry of a packed one."""
    width = batch["input_ids"].shape[1]
    if "row_spans" in batch:
        return [(int(r) * width + int(start), int(n)) for r, start, n in batch["row_spans"].tolist()]
    lengths = (batch["attention_mask"].sum(1) if "attention_mask" in batch
               else torch.full((n_examples,), width)).tolist()
    return [(i * width, int(n)) for i, n in enumerate(lengths)]


def kl_positions(batch: dict[str, torch.Tensor], chosen: list[bool]) -> tuple[torch.Tensor, list[int]]:
    """Flat positions of the labelled tokens of the chosen examples, example by example, and how
    many each chosen example has (the top-k cache is stored in that order)."""
    labelled = batch["shift_labels"].reshape(-1) != IGNORE_INDEX
    parts, counts = [], []
    for (start, n), take in zip(example_spans(batch, len(chosen)), chosen, strict=True):
        if not take:
            continue
        idx = labelled[start:start + n].nonzero().squeeze(1) + start
        parts.append(idx)
        counts.append(int(idx.numel()))
    device = batch["shift_labels"].device
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)), counts


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The base's forward without dropout (what the base model is), mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@dataclass
class KLAnchor:
    """The KL term of one run: which rows, which direction, and where the base's side comes from."""

    beta: float
    on: str
    kind: str
    # hidden states of the base for a batch (no graph), or None when the top-k cache serves
    base_hidden: Callable[[dict], torch.Tensor] | None
    base_head: nn.Linear | None = None
    topk: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def chooses(self, source: int) -> bool:
        return self.on == "all" or (self.on == "task") == (source == TASK)

    def term(self, batch: dict[str, torch.Tensor], rows: list[tuple[int, int]], hidden: torch.Tensor,
             head: nn.Linear, autocast) -> torch.Tensor:
        """Sum of the token KL over the labelled positions of the chosen rows of ``batch``
        (``rows``: the (source, index) each example came from, in batch order)."""
        from kernels.linear_cross_entropy import linear_kl_divergence, linear_kl_from_topk

        idx, counts = kl_positions(batch, [self.chooses(s) for s, _ in rows])
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
        if idx.numel() == 0:
            return h.sum() * 0.0  # keeps the graph (and DDP's bookkeeping) the same for every batch
        with autocast():
            if self.base_hidden is None:
                chosen = [key for key in rows if self.chooses(key[0])]
                ids = torch.cat([self.topk[key][0] for key in chosen]).to(h.device, torch.int64)
                logprobs = torch.cat([self.topk[key][1] for key in chosen]).to(h.device)
                if ids.shape[0] != idx.numel():
                    raise RuntimeError(f"kl_cache: {ids.shape[0]} cached positions for {idx.numel()} labelled ones")
                return linear_kl_from_topk(h, head.weight, ids, logprobs, bias_student=head.bias)
            with torch.no_grad():
                base = self.base_hidden(batch).reshape(-1, hidden.shape[-1]).index_select(0, idx)
            base_head = self.base_head if self.base_head is not None else head
            return linear_kl_divergence(h, head.weight, base, base_head.weight.detach(), kind=self.kind,
                                        bias_student=head.bias, bias_teacher=base_head.bias)


def build_kl_anchor(cfg: TrainConfig, model: nn.Module, lora: bool, fused_head: bool,
                    sources: dict[int, list[Example]], planned: set[tuple[int, int]], pad_id: int,
                    device: torch.device, autocast, progress: bool) -> KLAnchor | None:
    """The run's KL term (None when ``kl_to_base`` is 0), built on the model *before* training
    (so a frozen copy or the top-k cache is the base's)."""
    if cfg.kl_to_base <= 0:
        return None
    if not fused_head:
        raise ConfigError("kl_to_base needs the fused linear head (its KL runs chunk by chunk on the hidden "
                          "states); this model's head is not a plain linear map (see the 'loss:' line)")
    if cfg.kl_on != "task" and not sources[REPLAY]:
        if cfg.kl_on == "replay":
            raise ConfigError("kl_on=replay needs replay rows (replay_data and replay_ratio > 0)")
    anchor = KLAnchor(cfg.kl_to_base, cfg.kl_on, cfg.kl_kind, base_hidden=None)
    if lora:
        from kernels.lora_layers import lora_disabled

        def base_hidden(batch: dict) -> torch.Tensor:
            with lora_disabled(model), eval_mode(model), autocast():
                return final_hidden(model, batch)[0]

        anchor.base_hidden = base_hidden
        return anchor
    if cfg.kl_kind == "reverse" and cfg.kl_cache:
        raise ConfigError("kl_cache=true stores the base's top-k, which serves kl_kind=forward only")
    if not cfg.kl_cache:
        frozen = copy.deepcopy(model).requires_grad_(False).eval()
        anchor.base_head = frozen.get_output_embeddings()

        def base_hidden(batch: dict) -> torch.Tensor:
            with autocast():
                return final_hidden(frozen, batch)[0]

        anchor.base_hidden = base_hidden
        return anchor
    anchor.topk = base_topk(model, sources, sorted(k for k in planned if anchor.chooses(k[0])), cfg.kl_topk, pad_id,
                            cfg.per_device_eval_batch_size, device, autocast, progress)
    return anchor


@torch.no_grad()
def base_topk(model: nn.Module, sources: dict[int, list[Example]], keys: list[tuple[int, int]], k: int, pad_id: int,
              batch_size: int, device: torch.device, autocast, progress: bool
              ) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """The base's top-k (ids, log-probs) at each labelled position of each row in ``keys``."""
    from kernels.linear_cross_entropy import topk_log_probs

    out = {}
    bar = tqdm(total=len(keys), desc="kl_cache: base top-k", disable=not progress, leave=False)
    with eval_mode(model):
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            batch = to_device(build_batch([sources[s][i] for s, i in chunk], pad_id, packing=False), device)
            with autocast():
                hidden, head = final_hidden(model, batch)
            idx, counts = kl_positions(batch, [True] * len(chunk))
            ids, logprobs = topk_log_probs(hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx).float(),
                                           head.weight.float(), k, bias=None if head.bias is None else head.bias.float())
            for key, part_ids, part_lp in zip(chunk, ids.split(counts), logprobs.split(counts), strict=True):
                out[key] = (part_ids.to(torch.int32).cpu(), part_lp.half().cpu())
            bar.update(len(chunk))
    bar.close()
    return out
