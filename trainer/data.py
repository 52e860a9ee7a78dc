"""Training data: JSONL rows -> token ids and labels -> a seeded stream of padded batches.

Row formats (one JSON object per line, one format per row):

* ``{"text": ...}``: loss on every token (plus EOS).
* ``{"prompt": ..., "completion": ...}``: tokenized as ``prompt + completion + eos``; loss on
  the completion and the EOS only (prompt labels are -100).
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template when it has one; otherwise with the plain template below. Loss on the assistant
  turns only. The plain template writes each turn as ``"{role}: {content}"`` followed by EOS
  after an assistant turn and a newline after any other; the loss covers the assistant content
  and its EOS, so at inference a prompt ending in ``"assistant: "`` is answered up to EOS.
* ``{"prompt": ..., "privileged_context": ...}`` (TRL's SDFT rows; ``prompt`` a string or a list
  of messages): read as a chat whose last assistant turn is the privileged context, the
  demonstration ``objective=sdft`` shows its teacher (``trainer.sdft``).

Every line is checked before ``datasets`` loads the file, so a bad row is an error naming
``file:line`` and what is wrong. Rows longer than ``max_length`` tokens are cut at the right
and counted; a row whose labelled tokens all fall past the cut is dropped (and counted).

Replay: :func:`plan_batches` lays out the whole run as global batches of (source, index) where
the share of replay rows per batch follows ``replay_ratio`` (error diffusion, so every batch
is within one row of the target and the run total is exact up to rounding), at seeded random
positions inside each batch. The plan is a pure function of the seed, so a resumed run only
needs the step number to continue with the very same batches.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
TASK, REPLAY = 0, 1


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizedSet:
    path: str
    examples: list[Example]
    truncated: int = 0  # rows cut at max_length
    dropped: int = 0  # rows with no labelled token left after the cut
    fmt_counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.fmt_counts.items()))
        kinds = f"file rows: {kinds}" if kinds else "held out"
        note = f"; {self.truncated} truncated to max_length" if self.truncated else ""
        note += f"; {self.dropped} dropped (nothing to learn after truncation)" if self.dropped else ""
        return f"{self.path}: {len(self.examples)} examples ({kinds}){note}"


# ------------------------------------------------------------------------------ reading


def _row_format(row: object, where: str) -> str:
    """Which of the three formats a row is, or a DataError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" and m["content"] for m in msgs):
            raise DataError(f"{where}: 'messages' has no non-empty assistant turn to learn from")
        return "messages"
    if "privileged_context" in row:  # TRL's SDFT rows (objective=sdft): the demonstration is the context
        if not isinstance(row["privileged_context"], (str, list)) or not row["privileged_context"]:
            raise DataError(f"{where}: 'privileged_context' must be a non-empty string (the demonstration)")
        prompt = row.get("prompt")
        if isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt):
            return "prompt_privileged"
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"{where}: rows with 'privileged_context' need a 'prompt': a non-empty string or a "
                            "list of {role, content} messages")
        return "prompt_privileged"
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if key not in row:
                raise DataError(f"{where}: missing field '{key}' (rows with 'prompt' need 'completion' too)")
            if not isinstance(row[key], str):
                raise DataError(f"{where}: field '{key}' must be a string, got {type(row[key]).__name__}")
        if not row["completion"]:
            raise DataError(f"{where}: empty completion (nothing to learn from)")
        return "prompt_completion"
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise DataError(f"{where}: field 'text' must be a non-empty string")
        return "text"
    keys = ", ".join(sorted(row)) or "none"
    raise DataError(
        f"{where}: missing field: a row needs 'text', or 'prompt' and 'completion', or 'messages' (it has: {keys})"
    )


def read_jsonl(path: str | Path) -> list[dict]:
    """Check every line of a JSONL file, then load it with ``datasets``; returns the rows."""
    check_jsonl(path)
    import datasets  # deferred: importing datasets costs seconds, and bad data should fail fast

    datasets.disable_progress_bars()
    dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    return list(dataset)


def jsonl_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``("FILE:LINE", parsed row)`` for every non-blank line; ``DataError`` naming the line for
    text that is not UTF-8 or not JSON.  Lines are decoded one at a time (binary read), so the
    line a decoding error names is exact."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield where, row


def file_row_format(path: str | Path) -> str:
    """The row format of a (checked) JSONL file, read from its first row: messages |
    prompt_completion | text (check_jsonl makes sure a file holds one format)."""
    for where, row in jsonl_rows(path):
        return _row_format(row, where)
    raise DataError(f"{path}: empty file (no JSON rows)")


def check_jsonl(path: str | Path) -> int:
    """Check every line of a JSONL file (plain Python, no heavy imports); returns the row count."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    formats: set[str] = set()
    count = 0
    for where, row in jsonl_rows(p):
        formats.add(_row_format(row, where))
        count += 1
    if count == 0:
        raise DataError(f"{path}: empty file (no JSON rows)")
    if len(formats) > 1:
        raise DataError(f"{path}: rows mix formats ({', '.join(sorted(formats))}); use one format per file")
    return count


# ----------------------------------------------------------------------------- tokenizing


def _ids(tokenizer, text: str, first: bool) -> list[int]:
    # Only the first piece of a row gets the tokenizer's own specials (e.g. BOS); later pieces
    # are tokenized bare so that prompt and completion meet at a clean token boundary.
    return list(tokenizer(text, add_special_tokens=first)["input_ids"])


def _eos(tokenizer) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; set one (completions end with EOS)")
    return [tokenizer.eos_token_id]


def _encode_messages(tokenizer, messages: list[dict]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        # Assistant tokens = what the full render adds after the render of the earlier turns
        # plus the generation prompt (templates render prefixes stably).
        def render(msgs, gen):
            return list(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                                      return_dict=False))
        done = 0
        full = render(messages, False)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(render(messages[:i], True)) if i else 0
            end = len(render(messages[: i + 1], False))
            labels.extend([IGNORE_INDEX] * (start - done) + full[start:end])
            done = end
        labels.extend([IGNORE_INDEX] * (len(full) - done))
        return Example(full, labels[: len(full)])
    eos = _eos(tokenizer)
    for i, m in enumerate(messages):
        head = _ids(tokenizer, f"{m['role']}: ", first=(i == 0))
        body = _ids(tokenizer, m["content"], first=False)
        ids += head + body
        if m["role"] == "assistant":
            labels += [IGNORE_INDEX] * len(head) + body + eos
            ids += eos
        else:
            tail = _ids(tokenizer, "\n", first=False)
            ids += tail
            labels += [IGNORE_INDEX] * (len(head) + len(body) + len(tail))
    return Example(ids, labels)


def privileged_messages(row: dict) -> list[dict]:
    """A TRL SDFT row ``{"prompt", "privileged_context"}`` as a chat whose last assistant turn is
    the privileged context (its demonstration): what SFT learns from it, and where SDFT finds it."""
    prompt = row["prompt"]
    turns = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
             else [{"role": m["role"], "content": m["content"]} for m in prompt])
    context = row["privileged_context"]
    if not isinstance(context, str):  # a list of messages: their contents, one per line
        context = "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in context)
    return [*turns, {"role": "assistant", "content": context}]


def encode_row(tokenizer, row: dict) -> Example:
    """Token ids and labels (-100 where no loss) for one checked row."""
    if row.get("privileged_context") is not None:
        return _encode_messages(tokenizer, privileged_messages(row))
    if "messages" in row and row["messages"] is not None:
        return _encode_messages(tokenizer, row["messages"])
    if row.get("prompt") is not None:
        prompt = _ids(tokenizer, row["prompt"], first=True)
        completion = _ids(tokenizer, row["completion"], first=not prompt) + _eos(tokenizer)
        return Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
    ids = _ids(tokenizer, row["text"], first=True) + _eos(tokenizer)
    return Example(ids, list(ids))


def _encode_rows(tokenizer, rows: list[dict]) -> list[Example]:
    """encode_row for every row; prompt/completion and text rows go through the tokenizer in
    one batched call (~10x faster than row by row on the 40k-row demo corpus), same ids."""
    plain = [i for i, r in enumerate(rows)
             if not r.get("messages") and r.get("prompt") and r.get("privileged_context") is None]
    texts = [i for i, r in enumerate(rows) if not r.get("messages") and r.get("prompt") is None]
    out: list[Example | None] = [None] * len(rows)
    if plain:
        prompts = tokenizer([rows[i]["prompt"] for i in plain], add_special_tokens=True)["input_ids"]
        completions = tokenizer([rows[i]["completion"] for i in plain], add_special_tokens=False)["input_ids"]
        eos = _eos(tokenizer)
        for i, p, c in zip(plain, prompts, completions, strict=True):
            out[i] = Example(list(p) + list(c) + eos, [IGNORE_INDEX] * len(p) + list(c) + eos)
    if texts:
        eos = _eos(tokenizer)
        for i, ids in zip(texts, tokenizer([rows[i]["text"] for i in texts], add_special_tokens=True)["input_ids"],
                          strict=True):
            out[i] = Example(list(ids) + eos, list(ids) + eos)
    return [ex if ex is not None else encode_row(tokenizer, rows[i]) for i, ex in enumerate(out)]


def tokenize_file(path: str | Path, tokenizer, max_length: int, rows: list[dict] | None = None) -> TokenizedSet:
    rows = read_jsonl(path) if rows is None else rows
    out = TokenizedSet(path=str(path), examples=[])
    for row, ex in zip(rows, _encode_rows(tokenizer, rows), strict=True):
        fmt = ("messages" if row.get("messages") else "prompt_privileged" if row.get("privileged_context") is not None
               else "prompt_completion" if row.get("prompt") is not None else "text")
        out.fmt_counts[fmt] = out.fmt_counts.get(fmt, 0) + 1
        if len(ex.input_ids) > max_length:
            out.truncated += 1
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
        # The first label never counts (nothing predicts it), so a row needs one after it.
        if all(label == IGNORE_INDEX for label in ex.labels[1:]):
            out.dropped += 1
            continue
        out.examples.append(ex)
    if not out.examples:
        raise DataError(f"{path}: no example left with completion tokens within max_length={max_length}")
    return out


def split_validation(data: TokenizedSet, share: float, seed: int) -> tuple[TokenizedSet, TokenizedSet | None]:
    """Hold out ``share`` of the rows (seeded) for validation; at least one row each side."""
    if share <= 0 or len(data.examples) < 2:
        return data, None
    order = list(range(len(data.examples)))
    random.Random(f"val-split-{seed}").shuffle(order)
    n_val = min(len(order) - 1, max(1, round(share * len(order))))
    val_idx = set(order[:n_val])
    train = [ex for i, ex in enumerate(data.examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(data.examples) if i in val_idx]
    return (TokenizedSet(data.path, train, data.truncated, data.dropped, data.fmt_counts),
            TokenizedSet(f"{data.path} (validation split)", val))


# ------------------------------------------------------------------------ the batch plan


def steps_for(n_task: int, global_batch: int, replay_ratio: float, num_train_epochs: float, max_steps: int) -> int:
    """Optimizer steps of the run: max_steps, or enough batches for the epochs of task data."""
    if max_steps > 0:
        return max_steps
    task_per_batch = global_batch * (1.0 - replay_ratio)
    return max(1, math.ceil(num_train_epochs * n_task / task_per_batch))


def _cycled_permutations(n: int, count: int, seed: str) -> list[int]:
    """``count`` indices from back-to-back seeded permutations of range(n) (one per epoch)."""
    out: list[int] = []
    epoch = 0
    while len(out) < count:
        perm = list(range(n))
        random.Random(f"{seed}-{epoch}").shuffle(perm)
        out.extend(perm)
        epoch += 1
    return out[:count]


def plan_batches(n_task: int, n_replay: int, replay_ratio: float, global_batch: int, steps: int,
                 seed: int) -> list[list[tuple[int, int]]]:
    """The run's global batches as lists of (TASK|REPLAY, row index).

    Batch b holds ``round((b+1)*B*r) - round(b*B*r)`` replay rows, so the replay share is
    within one row of ``replay_ratio`` in every batch and exact over the run up to rounding.
    """
    replay_counts = []
    for b in range(steps):
        hi = math.floor((b + 1) * global_batch * replay_ratio + 0.5)
        lo = math.floor(b * global_batch * replay_ratio + 0.5)
        replay_counts.append(hi - lo if n_replay else 0)
    total_replay = sum(replay_counts)
    task_order = _cycled_permutations(n_task, steps * global_batch - total_replay, f"task-{seed}")
    replay_order = _cycled_permutations(n_replay, total_replay, f"replay-{seed}") if total_replay else []
    batches: list[list[tuple[int, int]]] = []
    t = r = 0
    for b, k in enumerate(replay_counts):
        kinds = [REPLAY] * k + [TASK] * (global_batch - k)
        random.Random(f"mix-{seed}-{b}").shuffle(kinds)
        batch = []
        for kind in kinds:
            if kind == REPLAY:
                batch.append((REPLAY, replay_order[r]))
                r += 1
            else:
                batch.append((TASK, task_order[t]))
                t += 1
        batches.append(batch)
    return batches


def micro_batches(global_batch: list, per_device: int, accumulation: int, rank: int, world: int) -> list[list]:
    """This rank's micro-batches of one global batch.

    Micro-step a, rank k takes rows ``[(a*world + k)*per_device, +per_device)``: every rank
    sees a disjoint shard and the union over ranks and micro-steps is the global batch.
    """
    out = []
    for a in range(accumulation):
        start = (a * world + rank) * per_device
        out.append(global_batch[start:start + per_device])
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding) and
    shift_labels.

    ``shift_labels[i, t]`` is the label of position ``t + 1`` of row ``i`` (-100 in the last
    column), so the loss is ``sum CE(logits[i, t], shift_labels[i, t])`` over every position,
    the same formula as for a packed batch (:func:`trainer.packing.pack_examples`).
    """
    import torch  # here, so that checking a config or a data file does not pay for importing torch

    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(ex.labels)
    shift_labels = torch.full_like(labels, IGNORE_INDEX)
    shift_labels[:, :-1] = labels[:, 1:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "shift_labels": shift_labels}


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Labels that enter the loss: the non-ignored ``shift_labels`` (padded and packed batches
    alike); for a batch without them, every non-ignored label after the first position."""
    if "shift_labels" in batch:
        return int((batch["shift_labels"] != IGNORE_INDEX).sum())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a batch: the attention mask's ones for a padded batch, the
    examples' lengths for a packed one (``trainer.packing.pack_examples``)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "row_spans" in batch:
        return int(batch["row_spans"][:, 2].sum())
    return int(batch["input_ids"].numel())


def group_by_length(global_batch: list[tuple[int, int]], sources: dict[int, list[Example]]) -> list[tuple[int, int]]:
    """The rows of one global batch, longest first (ties keep their planned order).

    Applied to each global batch *before* :func:`micro_batches` splits it, so rows of similar
    length share a micro-batch and pay for less padding. It only reorders a batch of the plan:
    every row stays exactly once, the replay count of the batch is unchanged, and the plan
    (a pure function of the seed) still decides which rows a step trains on, so resume and
    the loss (summed over the global batch, then divided by its labelled-token count) are
    unchanged too.
    """
    return sorted(global_batch, key=lambda row: -len(sources[row[0]][row[1]].input_ids))


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither pad_token nor eos_token")
    return pad
