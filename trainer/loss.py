"""The training objective of one batch, and the validation loss built from it.

The loop only ever asks for a *sum* of token losses over a batch; it divides by the
labelled-token count of the whole global batch itself, so gradient accumulation and the
number of processes change nothing but speed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer import distributed as D
from trainer.data import IGNORE_INDEX, Example, collate, count_loss_tokens


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
