"""The training objective of one batch, and the validation loss built from it.

The loop only ever asks for a *sum* of token losses over a batch; it divides by the
labelled-token count of the whole global batch itself, so gradient accumulation and the
number of processes change nothing but speed. Batches are padded or packed
(``trainer.packing``); both carry ``shift_labels`` (position t holds the label of t+1 in the
same row), so the loss is one formula for both.

Two ways to the same number:

* the **fused head** (default where it is exact): the model's body runs with its LM head
  swapped out for an identity, so the forward returns the final hidden states instead of the
  ``[tokens, vocab]`` logits; ``kernels.linear_cross_entropy`` then computes the loss and its
  gradients for ``h`` and the head weight chunk by chunk, on the labelled positions only. With
  a 49k vocabulary the logits (plus their gradient and softmax) are the largest tensors of a
  step; here they never exist whole. A tied head's gradient lands on the shared embedding,
  because the weight passed is that very Parameter.
* the **plain head**: the model's own logits and ``F.cross_entropy``, for heads the fused path
  cannot honour (soft-capping, a logit scale, a non-linear head, FSDP's sharded root). Which
  one runs is decided once per run by :func:`choose_head`, which *measures* that the fused
  path reproduces the model's own logits on a real row instead of trusting a list of models.

Either head can weight each token's loss (:data:`WEIGHTINGS`): ``probability`` is DFT
(``objective=dft``, arXiv 2508.05629), each token's NLL times the model's own detached
probability of that token, ``exp(-nll)``; the sum and the loop's division by the labelled-token
count are unchanged. The validation loss is always the unweighted NLL, so early stopping on it
watches the same quantity whatever the objective.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.linear_cross_entropy import WEIGHTINGS
from trainer import distributed as D
from trainer.data import IGNORE_INDEX, Example, collate, count_loss_tokens
from trainer.packing import build_batch, model_inputs, token_loss_sum_from_logits

# What each objective asks of the head; objectives the head does not weight (sft, and sdft, whose
# divergence is its own term) are plain next-token NLL here.
_WEIGHTING_OF_OBJECTIVE = {"dft": "probability"}


def token_weighting(cfg) -> str:
    """The per-token loss weighting ``cfg.objective`` asks for (one of :data:`WEIGHTINGS`)."""
    return _WEIGHTING_OF_OBJECTIVE.get(getattr(cfg, "objective", "sft"), "none")


def weighted_loss_sum_from_logits(logits: torch.Tensor, shift_labels: torch.Tensor, weighting: str) -> torch.Tensor:
    """The plain head's loss sum under ``weighting``: the token NLL in fp32 (float64 stays), each
    token's NLL times ``exp(-nll)`` (detached) for ``probability``; ignored positions add 0."""
    if weighting == "none":
        return token_loss_sum_from_logits(logits, shift_labels)
    logits = logits.reshape(-1, logits.size(-1))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    nll = F.cross_entropy(logits, shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return ((-nll.detach()).exp() * nll).sum()  # ignored positions: nll = 0


class _ReturnHidden(nn.Module):
    """Stands in for the LM head during a forward: the model's "logits" are then its hidden states."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


_RETURN_HIDDEN = _ReturnHidden()


def head_attribute(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(attribute name, module) of the model's output head, when it is a direct child."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, child in model.named_children():
        if child is head:
            return name, head
    return None


@contextlib.contextmanager
def hidden_states_out(model: nn.Module) -> Iterator[nn.Linear]:
    """While active, ``model(...)`` returns the final hidden states in ``.logits``; yields the head."""
    name, head = head_attribute(model)
    setattr(model, name, _RETURN_HIDDEN)
    try:
        yield head
    finally:
        setattr(model, name, head)


def final_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, nn.Linear]:
    """The body's output ``[..., d]`` for ``batch`` and the head it would have gone through."""
    with hidden_states_out(D.unwrap(model)) as head:
        hidden = model(**model_inputs(batch), use_cache=False).logits
    return hidden, head


@dataclass
class Head:
    """How the loss meets the vocabulary: ``fused`` (hidden states + linear cross-entropy) or plain,
    and how each token's loss is weighted (``weighting``, one of :data:`WEIGHTINGS`)."""

    fused: bool
    reason: str = ""
    weighting: str = "none"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Head: weighting={self.weighting!r} is not one of {', '.join(WEIGHTINGS)}")

    def unweighted(self) -> Head:
        """The same head with plain NLL (what the validation loss reports)."""
        return self if self.weighting == "none" else Head(self.fused, self.reason)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor], autocast) -> torch.Tensor:
        """Sum (not mean) of the (weighted) next-token cross-entropy over the labelled tokens of ``batch``."""
        return self.forward(model, batch, autocast)[0]

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor], autocast
                ) -> tuple[torch.Tensor, torch.Tensor | None, nn.Linear | None]:
        """(loss sum, final hidden states, head) for ``batch``; the plain head gives no hidden states."""
        if not self.fused:
            with autocast():
                logits = model(**model_inputs(batch), use_cache=False).logits
            return weighted_loss_sum_from_logits(logits, batch["shift_labels"], self.weighting), None, None
        from kernels.linear_cross_entropy import linear_cross_entropy

        with autocast():
            hidden, head = final_hidden(model, batch)
            # Ignored positions are dropped inside before any GEMM: the head runs on labelled tokens only.
            loss = linear_cross_entropy(hidden, head.weight, batch["shift_labels"], bias=head.bias, reduction="sum",
                                        weighting=self.weighting)
        return loss, hidden, head


PLAIN = Head(fused=False)


@torch.no_grad()
def choose_head(model: nn.Module, probe: Example, pad_id: int, device: torch.device, want: bool,
                sharded: bool, weighting: str = "none") -> Head:
    """The fused head where it gives this model's own logits, else the plain one (with the reason);
    either weights each token's loss as ``weighting`` says (see :func:`token_weighting`).

    The check runs the model once on ``probe`` both ways (fp32, eval mode): a head that is not a
    plain linear map of the final hidden states (soft-capping, a logit scale, a non-linear head)
    shows up as a mismatch, whatever the model type."""
    if not want:
        return Head(False, "fused_head=false", weighting)
    if sharded:
        return Head(False, "FSDP shards the head's weight between forwards", weighting)
    found = head_attribute(model)
    if found is None or type(found[1]) is not nn.Linear:
        kind = type(found[1]).__name__ if found else "not a direct child module"
        return Head(False, f"the output head is {kind}, not nn.Linear", weighting)
    head = found[1]
    was_training = model.training
    model.eval()
    try:
        short = Example(probe.input_ids[:32], probe.labels[:32])
        batch = {k: v.to(device) for k, v in collate([short], pad_id).items()}
        logits = model(**model_inputs(batch), use_cache=False).logits.float()
        hidden, _ = final_hidden(model, batch)
    finally:
        model.train(was_training)
    if hidden.shape[-1] != head.in_features:
        return Head(False, "the model does not feed its head the final hidden states", weighting)
    ours = F.linear(hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float())
    err = float((ours - logits).abs().max())
    scale = max(1.0, float(logits.abs().max()))
    if not math.isfinite(err) or err > 1e-4 * scale:
        return Head(False, f"the model's logits are not h W^T + b (max difference {err:.3g}): "
                           "soft-capping or a logit scale", weighting)
    return Head(True, weighting=weighting)


@torch.no_grad()
def validation_loss(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int,
                    ctx: D.DistContext, autocast, head: Head = PLAIN, packing: bool = False) -> float:
    """Mean token loss (plain NLL) over ``examples``, sharded over ranks (every rank runs the same batch count)."""
    return validation_sums(model, examples, batch_size, pad_id, ctx, autocast, head, packing)[0]


# (batch, final hidden states, head) -> a sum over the batch's labelled tokens (hidden: fused head only)
PerBatchSum = Callable[[dict[str, torch.Tensor], torch.Tensor, nn.Linear], torch.Tensor]


@torch.no_grad()
def validation_sums(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int,
                    ctx: D.DistContext, autocast, head: Head = PLAIN, packing: bool = False,
                    also: PerBatchSum | None = None) -> tuple[float, float | None]:
    """(mean token NLL, mean of ``also`` per labelled token or None) over ``examples``, in one
    pass: ``also`` (the fused head's only) reuses each batch's forward, e.g. the KL to the base."""
    head = head.unweighted()
    if also is not None and not head.fused:
        raise ValueError("validation_sums: `also` needs the fused head's hidden states")
    was_training = model.training
    model.eval()
    shard = examples[ctx.rank::ctx.world_size]
    per_rank = math.ceil(len(examples) / ctx.world_size)
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss, tokens, also
    for start in range(0, per_rank, batch_size):
        rows = shard[start:start + batch_size]
        weight = 1.0 if rows else 0.0  # an empty shard still joins FSDP's collectives
        batch = to_device(build_batch(rows or examples[:1], pad_id, packing), ctx.device)
        loss_sum, hidden, lm_head = head.forward(model, batch, autocast)
        totals[0] += weight * loss_sum.double()
        totals[1] += weight * count_loss_tokens(batch)
        if also is not None:
            totals[2] += weight * also(batch, hidden, lm_head).double()
    D.all_reduce_sum(totals, ctx)
    model.train(was_training)
    return float(totals[0] / totals[1]), (float(totals[2] / totals[1]) if also is not None else None)


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors moved to ``device`` (packed batches also carry plain ints)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], autocast) -> torch.Tensor:
    """The plain head's loss sum (the reference the fused head is tested against)."""
    return PLAIN.loss_sum(model, batch, autocast)
