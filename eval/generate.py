"""Batched greedy generation: left padding, the model's KV cache, a stop per row.

Why by hand instead of ``model.generate``: on a ~1M-parameter model every decoding step
costs a few milliseconds of Python, and ``generate`` adds its logits processors, stopping
criteria and cache bookkeeping to each one; this loop is the whole algorithm (prefill once,
then one token per step for the rows still running) and stops a row at EOS or at the first
token whose text holds a newline (chat answers, which are multi-line: at the end of the
turn).  Greedy = ``argmax`` (first index on ties): deterministic.
``sampling=Sampling(...)`` draws instead (temperature, nucleus top_p, one seeded generator for
the whole call).
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from kernels import backend


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# Below this many parameters a CPU forward is a chain of microsecond ops, and waking a pool
# of intra-op threads for each costs more than the op (measured: a 2-layer 48-wide Llama, a
# [64, 1] decoding step, 2 busy cores: 52 ms with 2 threads, 5.7 ms with 1).
SMALL_MODEL_PARAMS = backend.SMALL_MODEL_PARAMS


@contextlib.contextmanager
def cpu_threads_for(model: torch.nn.Module) -> Iterator[None]:
    """Run a small model on one CPU thread (restored afterwards); leave larger or GPU models alone."""
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS
    if model_device(model).type != "cpu" or not small or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pad_token_id(tokenizer) -> int:
    """The id used to fill padding (masked out, so any valid id works)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    sources = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None),
               getattr(getattr(model, "config", None), "eos_token_id", None)]
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


def newline_token_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """Bool [vocab_size]: tokens whose decoded text contains a newline (generation stops there)."""
    n = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i, text in enumerate(texts):
        if "\n" in text:
            mask[i] = True
    return mask


def _cache_kwarg(model) -> str:
    # transformers 5 renamed `past_key_values` to `cache`; speak whichever this model takes.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _should_drop_finished(running: torch.Tensor, cache) -> bool:
    # Selecting rows copies the whole cache, so do it only when a quarter of the batch is done.
    finished = int((~running).sum())
    return finished > 0 and 4 * finished >= running.numel() and hasattr(cache, "batch_select_indices")


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: softmax(logits / temperature) cut to the nucleus (the most likely
    tokens whose probabilities reach ``top_p``), one draw per row from a generator seeded
    with ``seed``; the same prompts, batch size and seed give the same answers."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"sampling temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")


def next_tokens(logits: torch.Tensor, sampling: Sampling | None, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab]: argmax, or a draw as ``sampling`` says."""
    if sampling is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p (the first token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def max_positions(model) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int] = 32,
    batch_size: int = 64,
    stop_mask: torch.Tensor | None = None,
    on_batch: Callable[[int], None] | None = None,
    stop_at_newline: bool = True,
    sampling: Sampling | None = None,
    stop_token_ids: Iterable[int] = (),
    add_special_tokens: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts`` (fed verbatim), each cut at EOS or its first newline.

    ``max_new_tokens`` is one int or one per prompt.  Prompts are sorted by token length so
    a batch holds similar lengths (little padding); results come back in input order.
    ``on_batch(n)`` is called after each batch with the number of prompts it finished.

    Chat answers are multi-line: ``stop_at_newline=False`` runs each row to EOS, to one of
    ``stop_token_ids`` (the template's end of turn, e.g. ``<|im_end|>``; like EOS it is not
    part of the text) or to its budget, and returns the whole text.  ``add_special_tokens=False``
    for prompts that already hold their specials (a rendered chat template).  ``sampling``: draw
    tokens (see :class:`Sampling`) instead of argmax.
    """
    with cpu_threads_for(model), torch.no_grad():
        return _greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_mask, on_batch,
                                stop_at_newline, set(stop_token_ids), add_special_tokens, sampling)


def _greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_mask, on_batch,
                     stop_at_newline=True, stop_token_ids=frozenset(), add_special_tokens=True,
                     sampling=None) -> list[str]:
    if isinstance(max_new_tokens, int):
        budgets = [max_new_tokens] * len(prompts)
    else:
        budgets = [int(b) for b in max_new_tokens]
        if len(budgets) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(budgets)} entries for {len(prompts)} prompts")
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = model_device(model)
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    limit = max_positions(model)
    if stop_mask is None:
        vocab = model.get_output_embeddings().weight.shape[0]
        stop_mask = (newline_token_mask(tokenizer, vocab) if stop_at_newline
                     else torch.zeros(vocab, dtype=torch.bool))
    stop_mask = stop_mask.to(device).clone()  # EOS ids are added below; leave the caller's mask alone
    eos_ids = eos_token_ids(model, tokenizer) | {int(t) for t in stop_token_ids}
    for eos in eos_ids:
        if eos < stop_mask.numel():
            stop_mask[eos] = True
    pad_id = pad_token_id(tokenizer)
    cache_name = _cache_kwarg(model)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling is not None else None

    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        steps = max(budgets[i] for i in idx)
        rows = []
        for i in idx:
            ids = encoded[i]
            if limit is not None and len(ids) + budgets[i] > limit:
                ids = ids[-max(1, limit - budgets[i]):]  # keep the end of the prompt: it is what is continued
            rows.append(ids)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[r, width - len(ids):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        budget = torch.tensor([budgets[i] for i in idx], device=device)

        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                    use_cache=True, **keep_last)
        if bool(out.logits.isnan().any()):
            # Seen with eager attention in float64: fully masked padding rows turn into NaN
            # that leaks through the values into the real tokens.
            raise RuntimeError("the model returned NaN logits on a left-padded batch; load it in float32/bfloat16 "
                               "or with attn_implementation='sdpa', or use batch_size=1")
        running = torch.ones(len(rows), dtype=torch.bool, device=device)
        rows_in_batch = torch.arange(len(rows), device=device)  # batch row -> row of `generated`
        generated = torch.full((len(rows), steps), pad_id, dtype=torch.long, device=device)
        last_pos = positions[:, -1:]
        for step in range(steps):
            next_token = next_tokens(out.logits[:, -1, :], sampling, generator)
            next_token = torch.where(running, next_token, torch.full_like(next_token, pad_id))
            generated[rows_in_batch, step] = next_token
            running = running & ~stop_mask[next_token] & (budget > step + 1)
            if step + 1 == steps or not bool(running.any()):
                break
            cache = _returned_cache(out)
            if _should_drop_finished(running, cache):
                # Finished rows leave the batch: later steps cost only what is still running.
                keep = running.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows_in_batch, next_token, running = rows_in_batch[keep], next_token[keep], running[keep]
                attention, last_pos, budget = attention[keep], last_pos[keep], budget[keep]
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            last_pos = last_pos + 1
            out = model(input_ids=next_token[:, None], attention_mask=attention, position_ids=last_pos,
                        use_cache=True, **{cache_name: cache}, **keep_last)

        for r, i in enumerate(idx):
            kept = []
            for t in generated[r].tolist()[:budgets[i]]:
                if t in eos_ids:
                    break
                kept.append(t)
                if bool(stop_mask[t]):
                    break
            text = tokenizer.decode(kept, skip_special_tokens=True)
            results[i] = text.split("\n", 1)[0] if stop_at_newline else text
        if on_batch is not None:
            on_batch(len(idx))
    model.train(was_training)
    return results
