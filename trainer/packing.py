"""Padding-free batches: the rows of a micro-batch laid end to end in one row, no compute on padding.

A padded batch ``[n, max_len]`` makes every row pay for the longest one: with 20% replay rows
three times as long as the task rows, most of a step is spent on padding. A packed batch is
``[1, L]`` with ``L = sum(len(row))``: ``input_ids`` end to end, ``position_ids`` restarting at 0
at each row, and **no attention mask**. That is the layout of TRL's ``padding_free`` and of
``transformers.DataCollatorWithFlattening``, and transformers (5.x) honours it by itself:

* eager / sdpa / flex attention: ``masking_utils.create_causal_mask`` (and the sliding-window
  variant), given ``attention_mask=None``, no cache and ``position_ids``, calls
  ``find_packed_sequence_indices``: a new row starts wherever the position does not grow by 1,
  and the causal mask is AND-ed with "same row" (``packed_sequence_mask_function``). So the
  model must be called with ``use_cache=False`` (a cache turns the detection off);
* flash attention: ``_flash_attention_forward`` with no mask takes ``cu_seq_lens_q/k`` and
  ``max_length_q/k`` when given (the varlen kernel, no cross-row attention), else infers them
  from ``position_ids`` (``_is_packed_sequence``, a device sync in every layer).
  :func:`pack_examples` can add those four (``flash_attention_kwargs=True``).

Whether a model really confines attention to each row is not assumed: :func:`probe_packing`
runs two rows packed and alone and compares the logits, and :func:`packing_support` says yes
only for the architectures and attention implementations that this probe and
``tests/test_packing.py`` verified (``VERIFIED_MODEL_TYPES`` x ``VERIFIED_ATTENTION``).

The loss is computed the same way for both layouts from ``shift_labels`` (aligned with the
inputs: position ``t`` holds the label of position ``t + 1`` of the same row, -100 at every
row's last position, so no token is trained to predict the next row's first token)::

    loss_sum = F.cross_entropy(logits.flatten(0, -2).float(), batch["shift_labels"].flatten(),
                               ignore_index=-100, reduction="sum")

and ``trainer.data.count_loss_tokens`` counts the same labels in both layouts. The packed
``labels`` also carry -100 at each row's first position (that label never counts: nothing
predicts it), so the classic shift ``labels[:, 1:]`` of a packed batch equals its
``shift_labels`` too, and HF's own ``model(..., labels=labels)`` loss is right for it.

How the training loop uses this (the call contract)::

    layout = resolve_layout(cfg.packing, cfg.group_by_length, model)  # log layout.reason once
    rows = plan[step]                                                 # the seeded plan, unchanged
    if layout.group_by_length:
        rows = group_by_length(rows, sources)                         # trainer.data
    for mb in micro_batches(rows, ...):
        batch = build_batch([sources[s][i] for s, i in mb], pad_id, layout.packing)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = model(**model_inputs(batch), use_cache=False).logits  # packed: no attention_mask
        loss_sum = token_loss_sum_from_logits(logits, batch["shift_labels"])
    # normalise by sum(count_loss_tokens(b)) over the global batch, as before; real tokens for
    # tokens/s: sum(count_input_tokens(b)) (both in trainer.data)

A fused head takes the body's hidden states from the same ``model_inputs`` and the same
``shift_labels``. The Fisher pass keeps padded batches (``collate``: it reads ``attention_mask``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.config import ConfigError
from trainer.data import IGNORE_INDEX, Example, collate

# Architectures whose packed forward this repository checked, by probe and by the loss and
# gradient tests of tests/test_packing.py (transformers 5.24): same logits as each row alone,
# no attention across rows. Others may well work (any model built on masking_utils' masks
# should) but are not claimed.
VERIFIED_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral", "gpt2"})
# flash_attention_2/3 are supported by transformers through cu_seq_lens / position_ids, but no
# flash-attn build was available to verify them here; flex_attention was not checked either.
VERIFIED_ATTENTION = frozenset({"eager", "sdpa"})
# Keys of a batch that go to the model's forward (the rest are for the loss and the counts).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids",
                    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def pack_rows(lengths: list[int], max_row_tokens: int | None) -> list[list[int]]:
    """Which examples share a packed row: first-fit decreasing into rows of at most
    ``max(max_row_tokens, longest example)`` tokens (an example is never split); ``None``: one
    row holding every example in order."""
    if max_row_tokens is None:
        return [list(range(len(lengths)))]
    capacity = max(max_row_tokens, max(lengths))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack_examples(examples: list[Example], pad_id: int = 0, max_row_tokens: int | None = None,
                  flash_attention_kwargs: bool = False) -> dict[str, torch.Tensor | int]:
    """One packed micro-batch of ``examples``.

    By default every example goes end to end into a single row: tensors ``[1, L]``, ``L`` =
    total tokens. With ``max_row_tokens`` the examples are first-fit-decreasing packed into
    ``k`` rows of at most that many tokens (``[k, W]``, ``W`` = the fullest row); the shorter
    rows end in a pad tail, which is a segment of its own (positions from 0, labels -100), so
    no real token attends to it. ``max_row_tokens = max(lengths)`` never computes more tokens,
    nor more attention, than the padded batch of the same examples; one row costs the fewest
    tokens but attention over all of them (an sdpa/eager mask is ``L x L``), which loses when
    the rows are long and of equal length.

    * ``input_ids``; ``position_ids``: ``0 .. len(example) - 1`` for each example (and each tail);
    * ``labels``: the examples' labels with -100 at each example's first position;
    * ``shift_labels``: ``labels`` moved one position left within each example, -100 at each
      example's last position;
    * ``row_spans``: ``[n_examples, 3]`` = (packed row, start, length) of each example, in the
      order given (per-example losses, real-token counts; not a model input);
    * with ``flash_attention_kwargs``: ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 offsets of
      every segment, tails included, over the flattened batch) and ``max_length_q`` /
      ``max_length_k`` (Python ints), which transformers' flash-attention path passes to the
      varlen kernel.

    No ``attention_mask``: its absence is what makes transformers look at ``position_ids``.
    """
    if not examples:
        raise ValueError("pack_examples: no examples to pack")
    lengths = [len(ex.input_ids) for ex in examples]
    for i, (ex, n) in enumerate(zip(examples, lengths, strict=True)):
        if n == 0:
            raise ValueError(f"pack_examples: example {i} has no tokens")
        if len(ex.labels) != n:
            raise ValueError(f"pack_examples: example {i} has {n} input ids but {len(ex.labels)} labels")
    groups = pack_rows(lengths, max_row_tokens)
    width = max(sum(lengths[i] for i in g) for g in groups)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    labels = torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long)
    spans = torch.zeros((len(examples), 3), dtype=torch.long)
    segments: list[int] = []  # every segment's length, row-major (for the flash offsets)
    for r, group in enumerate(groups):
        start = 0
        for i in group:
            n = lengths[i]
            input_ids[r, start:start + n] = torch.tensor(examples[i].input_ids)
            position_ids[r, start:start + n] = torch.arange(n)
            labels[r, start + 1:start + n] = torch.tensor(examples[i].labels[1:])  # the first never counts
            spans[i] = torch.tensor([r, start, n])
            segments.append(n)
            start += n
        if start < width:  # the pad tail: its own segment, so nothing real attends to it
            position_ids[r, start:] = torch.arange(width - start)
            segments.append(width - start)
    shift_labels = torch.full_like(labels, IGNORE_INDEX)
    # Every segment starts with label -100, so each one's last position gets -100 here.
    shift_labels[:, :-1] = labels[:, 1:]
    batch: dict[str, torch.Tensor | int] = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels,
                                            "shift_labels": shift_labels, "row_spans": spans}
    if flash_attention_kwargs:
        offsets = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch.update(cu_seq_lens_q=offsets, cu_seq_lens_k=offsets.clone(),
                     max_length_q=max(segments), max_length_k=max(segments))
    return batch


# The row width at which a packed row's attention costs about as much as its tokens' matmuls. A
# packed row is attended under an explicit mask, which the kernels cannot skip blocks of, so a row
# of W tokens costs about 12 W d L FLOPs a token forward and backward (d the model width, L the
# layers) against LoRA's 4 N (N the matmul parameters); on SmolLM2-135M that is W = 2,600 by FLOPs,
# and CPU attention runs at about a third of the GEMMs' rate (docs/benchmarks.md, the bf16 profile),
# so about 900; full fine-tuning's 6 N puts it higher. Only the choice among a few widths rests on it.
ATTENTION_EQUAL_WIDTH = 1024
# Row budgets tried, as multiples of the longest example of the micro-batch.
ROW_WIDTH_FACTORS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def packed_row_budget(lengths: list[int]) -> int:
    """The row budget :func:`build_batch` packs a micro-batch of ``lengths`` into: of the budgets
    ``ROW_WIDTH_FACTORS`` x the longest example, the one whose :func:`pack_rows` layout ``[k, W]``
    costs least, counting the tokens it computes and their attention,
    ``k W (1 + W / ATTENTION_EQUAL_WIDTH)`` (ties: the narrower). Why not always the longest example: when the other examples are a little
    over half its length (task rows of 90 tokens beside self-replay rows of 170), each sits alone
    in a row of 170 and 40% of the tokens computed are pad tails; a budget of twice the task rows
    puts two in a row."""
    longest, total = max(lengths), sum(lengths)
    best_cost, best_budget = None, longest
    for factor in ROW_WIDTH_FACTORS:
        budget = min(total, int(longest * factor))
        groups = pack_rows(lengths, budget)
        width = max(sum(lengths[i] for i in group) for group in groups)
        cost = len(groups) * width * (1 + width / ATTENTION_EQUAL_WIDTH)
        if best_cost is None or cost < best_cost:
            best_cost, best_budget = cost, budget
    return best_budget


def build_batch(examples: list[Example], pad_id: int, packing: bool) -> dict[str, torch.Tensor | int]:
    """A micro-batch as the training loop should build it: packed into rows of the budget
    :func:`packed_row_budget` picks when ``packing`` (its cost is never above that of rows of the
    longest example's length, which compute no more tokens and no more attention than the padded
    batch), else padded.

    Why not always one ``[1, L]`` row: an sdpa/eager mask over L tokens makes attention cost
    grow with L^2; at SmolLM2-135M's shape (width 576, 30 layers) eight rows of 512 in one row
    would spend about as much on attention as on every matmul of the model (12 L H Q T against
    6 N FLOPs per token), where rows of 512 spend an eighth of that.
    """
    if packing:
        return pack_examples(examples, pad_id=pad_id,
                             max_row_tokens=packed_row_budget([len(ex.input_ids) for ex in examples]))
    return collate(examples, pad_id)


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of the model's forward for a padded or a packed batch (call it
    with ``use_cache=False`` as well)."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def token_loss_sum_from_logits(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """``sum_t CE(logits[t], shift_labels[t])`` over the labelled positions, in fp32: the loss of
    a padded and of a packed batch alike."""
    logits = logits.reshape(-1, logits.size(-1))
    if logits.dtype in (torch.float16, torch.bfloat16):  # fp32 softmax; float64 stays float64
        logits = logits.float()
    return nn.functional.cross_entropy(logits, shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def _hf_config(model: nn.Module):
    # DDP/FSDP keep the model in .module; PEFT's wrapper exposes the base config as .config.
    inner = getattr(model, "module", model)
    return getattr(inner, "config", None)


def packing_support(model: nn.Module) -> tuple[bool, str]:
    """Whether ``model`` honours packed ``position_ids`` (see ``VERIFIED_MODEL_TYPES`` and
    ``VERIFIED_ATTENTION``), and why: the reason is meant for the run's log."""
    config = _hf_config(model)
    if config is None or not hasattr(config, "model_type"):
        return False, f"{type(model).__name__} has no Hugging Face config, so its attention is unknown"
    model_type = config.model_type
    attention = getattr(config, "_attn_implementation", None) or "eager"
    verified = ", ".join(sorted(VERIFIED_MODEL_TYPES))
    if model_type not in VERIFIED_MODEL_TYPES:
        return False, (f"model_type={model_type!r}: packed position_ids are not verified for this architecture "
                       f"(verified: {verified})")
    if attention not in VERIFIED_ATTENTION:
        return False, (f"attention implementation {attention!r}: packing not verified with it "
                       f"(verified: {', '.join(sorted(VERIFIED_ATTENTION))})")
    if getattr(config, "add_cross_attention", False):
        return False, "cross-attention models are not packed"
    return True, f"{model_type} with {attention} attention honours packed position_ids (verified)"


@dataclass
class PackingProbe:
    """What :func:`probe_packing` saw, as max |difference| of logits."""

    packed_vs_alone: float  # each row packed against the same row run alone
    # The later rows' logits when the first row's tokens change: 0 when attention is confined
    # to each row. (The other way round, a later row changing an earlier one, the causal mask
    # already forbids; it is checked too and folded in here.)
    across_rows: float

    @property
    def confined(self) -> bool:
        return self.across_rows == 0.0

    def ok(self, tol: float = 1e-4) -> bool:
        return self.confined and self.packed_vs_alone <= tol


@torch.no_grad()
def probe_packing(model: nn.Module, lengths: tuple[int, ...] = (7, 5, 9), seed: int = 0) -> PackingProbe:
    """Run a few seeded random rows packed and each alone, and packed again with one row's
    tokens changed; compare the logits.

    Cheap (a few dozen tokens), on the model's device, in eval mode (restored afterwards).
    """
    if len(lengths) < 2:
        raise ValueError("probe_packing needs at least two rows")
    config = _hf_config(model)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise ValueError("probe_packing needs a model config with vocab_size")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    was_training = model.training
    model.eval()
    try:
        def packed_logits(row_ids: list[list[int]]) -> torch.Tensor:
            batch = pack_examples([Example(r, list(r)) for r in row_ids])
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            return model(**inputs, use_cache=False).logits[0].float()

        packed = packed_logits(rows)
        worst = 0.0
        start = 0
        for r in rows:
            alone = model(input_ids=torch.tensor([r], device=device), use_cache=False).logits[0].float()
            worst = max(worst, float((packed[start:start + len(r)] - alone).abs().max()))
            start += len(r)
        first, second = len(rows[0]), len(rows[0]) + len(rows[1])
        changed_first = packed_logits([[(t + 1) % vocab for t in rows[0]], *rows[1:]])
        changed_second = packed_logits([rows[0], [(t + 1) % vocab for t in rows[1]], *rows[2:]])
        leak = max(float((changed_first[first:] - packed[first:]).abs().max()),
                   float((changed_second[:first] - packed[:first]).abs().max()),
                   float((changed_second[second:] - packed[second:]).abs().max()) if len(rows) > 2 else 0.0)
    finally:
        model.train(was_training)
    return PackingProbe(packed_vs_alone=worst, across_rows=leak)


@dataclass
class BatchLayout:
    """How the run lays out its micro-batches, and why (one log line)."""

    packing: bool
    group_by_length: bool
    reason: str


def resolve_layout(packing: str, group_by_length: bool, model: nn.Module) -> BatchLayout:
    """The config's ``packing`` (auto | true | false) and ``group_by_length`` for ``model``.

    ``auto`` packs where :func:`packing_support` says yes; where it says no, the run falls back
    to length-grouped padded batches (the documented fallback). ``true`` on a model that is not
    supported is a ConfigError with the reason, rather than a silently wrong loss.
    """
    if packing not in ("auto", "true", "false"):
        raise ConfigError(f"packing={packing!r}: must be auto, true or false")
    if packing == "false":
        return BatchLayout(False, group_by_length, "packing=false: padded batches"
                           + (", grouped by length" if group_by_length else ""))
    ok, why = packing_support(model)
    if ok:
        return BatchLayout(True, False, f"packing: {why}")
    if packing == "true":
        raise ConfigError(f"packing=true, but {why}; use packing=auto (length-grouped padded batches) or false")
    return BatchLayout(False, True, f"packing=auto: not packing ({why}); padded batches grouped by length")
