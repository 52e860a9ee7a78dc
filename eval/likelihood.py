"""Log-likelihood scoring: summed log-probability of answer choices, and perplexity on text.

Choice rows follow lm-evaluation-harness's ``acc``: the context is the prompt tokenized
with the tokenizer's special tokens, each choice is tokenized on its own without them and
appended (the choice text is used verbatim: write ``" Paris"`` if the answer follows a
space), and the prediction is the choice with the largest summed log-probability.  A prompt
rendered with a chat template already holds its specials and is tokenized without them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .generate import cpu_threads_for, max_positions, model_device, pad_token_id


def _right_padded(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= 1, shape [B, T-1], in float32."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1, :]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # half-precision log-softmax loses the small differences between choices
    targets = ids[:, 1:]
    picked = logits.gather(-1, targets[..., None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def choice_logliks(
    model,
    tokenizer,
    prompt_choices: Sequence[tuple[str, Sequence[str]]],
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    add_special_tokens: bool | Sequence[bool] = True,
) -> list[list[float]]:
    """For each (prompt, choices): the summed log-likelihood of every choice given the prompt.

    ``add_special_tokens`` (one bool, or one per prompt): False for prompts that already hold
    their specials (a rendered chat template), so that no second BOS is added.
    """
    with cpu_threads_for(model), torch.no_grad():
        return _choice_logliks(model, tokenizer, prompt_choices, batch_size, on_batch, add_special_tokens)


def _choice_logliks(model, tokenizer, prompt_choices, batch_size, on_batch, add_special_tokens=True):
    was_training = model.training
    model.eval()
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    limit = max_positions(model)
    prompts = [p for p, _ in prompt_choices]
    specials = ([add_special_tokens] * len(prompts) if isinstance(add_special_tokens, bool)
                else [bool(x) for x in add_special_tokens])
    if len(specials) != len(prompts):
        raise ValueError(f"add_special_tokens has {len(specials)} entries for {len(prompts)} prompts")
    contexts: list[list[int]] = [[] for _ in prompts]
    for flag in (True, False):  # one tokenizer call per setting, not per prompt
        idx = [i for i, s in enumerate(specials) if s is flag]
        if idx:
            for i, ids in zip(idx, tokenizer([prompts[i] for i in idx], add_special_tokens=flag)["input_ids"],
                              strict=True):
                contexts[i] = list(ids)
    pairs: list[tuple[int, int, list[int], int]] = []  # (row, choice, sequence, n_continuation)
    for r, (_, choices) in enumerate(prompt_choices):
        conts = tokenizer(list(choices), add_special_tokens=False)["input_ids"]
        for c, cont in enumerate(conts):
            if not cont:
                raise ValueError(f"choice {choices[c]!r} tokenizes to nothing")
            context = contexts[r] or [pad_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id]
            if limit is not None and len(cont) >= limit:
                raise ValueError(f"choice {choices[c]!r} is {len(cont)} tokens, longer than the model's context")
            seq = context + cont
            if limit is not None and len(seq) > limit:
                seq = seq[-limit:]  # drop the start of the context, keep the whole choice
            pairs.append((r, c, seq, len(cont)))

    results = [[0.0] * len(ch) for _, ch in prompt_choices]
    remaining = [len(ch) for _, ch in prompt_choices]  # choices left per row, for progress
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][2]))
    for start in range(0, len(order), batch_size):
        chunk = [pairs[k] for k in order[start:start + batch_size]]
        ids, mask = _right_padded([p[2] for p in chunk], pad_id, device)
        logp = _token_logprobs(model, ids, mask)
        for b, (r, c, seq, n_cont) in enumerate(chunk):
            # tokens seq[len-n_cont:] are predicted at logp positions len-n_cont-1 .. len-2
            end = len(seq) - 1
            results[r][c] = float(logp[b, end - n_cont:end].double().sum())
        finished = 0
        for r, *_ in chunk:
            remaining[r] -= 1
            finished += remaining[r] == 0
        if on_batch is not None and finished:
            on_batch(finished)
    model.train(was_training)
    return results


@dataclass
class Perplexity:
    perplexity: float
    nll_per_token: float
    tokens: int  # number of predicted tokens
    window: int


def text_perplexity(model, tokenizer, text: str, window: int = 256, batch_size: int = 16) -> Perplexity:
    """exp(mean NLL) over the text, cut into non-overlapping windows of ``window`` tokens.

    Each window predicts its tokens 2..n from the ones before it in the same window (the
    first token of each window is not scored), so the number depends on ``window``, which
    is recorded in the report.
    """
    with cpu_threads_for(model), torch.no_grad():
        return _text_perplexity(model, tokenizer, text, window, batch_size)


def _text_perplexity(model, tokenizer, text: str, window: int, batch_size: int) -> Perplexity:
    if not text.strip():
        raise ValueError("the held-out text is empty")
    was_training = model.training
    model.eval()
    limit = max_positions(model)
    window = min(window, limit) if limit else window
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("the held-out text is shorter than two tokens")
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        ids_t, mask = _right_padded(chunk, pad_id, device)
        logp = _token_logprobs(model, ids_t, mask)
        valid = mask[:, 1:].bool()
        total -= float(logp[valid].double().sum())
        count += int(valid.sum())
    model.train(was_training)
    nll = total / count
    return Perplexity(perplexity=math.exp(nll), nll_per_token=nll, tokens=count, window=window)
