"""The project's one sampler (eval, self-replay, SDFT rollouts): batched, KV-cached, a stop per row.

:func:`generate_ids` is the core: token ids in, generated ids out (each row ending with the stop
token that ended it, or cut at its budget); :func:`greedy_generate` is the text layer over it
(tokenize, stop at EOS / end of turn / a newline, decode).  Per batch: one left-padded prefill
that keeps only the last position's logits, then one token per step for every row, until all
rows have stopped.  Nothing a step needs is allocated in Python per token: the KV cache is
preallocated (eval.kv_cache: written in place, read as a view of the filled slots), the 2D
attention mask has a column for every position the batch can reach (a step sets one and
passes a view), tokens go into one ``[rows, steps]`` buffer read back once, and a step reads
one value off the tensors (how many rows still run).  Rows that finished leave the batch once
a quarter of it is done (the cache rows are selected then, not every step).

Greedy = ``argmax`` (first index on ties), token for token what HF ``generate`` picks
(tests/test_sampler.py).  ``sampling=Sampling(...)`` draws instead (temperature, nucleus top_p,
one generator seeded per call).  ``precision="bf16"``/``"auto"`` decodes in a bf16 copy of the
weights kept between calls (:func:`decoding_model`), whose lean steps on the CPU group the
attention queries (eval.fast_decode.GROUP_QUERIES: 1.4x a bf16 step at batch 16, and greedy answers
that can part from HF's bf16 ``generate`` at near-ties); ``compile_steps=True`` runs the one-token
steps through ``torch.compile`` with an eager fallback (:func:`_step_runner`).  For Llama and Qwen2 models
(LoRALinear included) the one-token steps skip HF's module calls: ``eval.fast_decode`` runs them
as plain tensor ops over the same cache (1.4-1.6x HF's step at batch 1 on SmolLM2, fp32; about
1.05x at batch 16, where matrix multiplies are most of a step); anything it cannot reproduce
falls back to the model's own forward.

Why not ``model.generate``: on small models every step is mostly Python, and ``generate`` adds
its logits processors, stopping criteria and cache bookkeeping (a ``DynamicCache`` that
concatenates every layer's keys and values each step) to each one; it also has no per-row
token budget.  ``python -m bench generate`` measures the two side by side.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from copy import deepcopy
from dataclasses import dataclass

import torch

from kernels import backend

from .fast_decode import LeanDecoder
from .kv_cache import preallocated_cache


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


PRECISIONS = ("model", "bf16", "auto")
# A bf16 copy per model, refreshed parameter by parameter when its weights change (see decoding_model).
_BF16_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def wants_bf16(model, precision: str) -> bool:
    """``precision``: "model" decodes in the model's own dtype; "bf16" in a bf16 copy of a floating-point
    model; "auto" in bf16 only where that is fast: a float32 model on a CPU that multiplies bf16
    natively (kernels.backend.cpu_has_native_bf16; elsewhere bf16 GEMMs are emulated and slower)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "model":
        return False
    # Every parameter's dtype, not the first one's: a LoRA run under bf16 holds its frozen base in
    # bf16 (kernels.lora_layers.store_base_weights) beside fp32 embeddings, norms and factors.
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if precision == "bf16":
        return bool(dtypes - {torch.bfloat16})
    return torch.float32 in dtypes and model_device(model).type == "cpu" and backend.cpu_has_native_bf16()


def decoding_model(model, precision: str = "model"):
    """The module that decodes: ``model`` itself, or (see :func:`wants_bf16`) a bf16 copy of it.

    The copy shares nothing with ``model`` that a step writes (its parameters are bf16 tensors of
    their own, except those already bf16, such as a LoRA run's frozen base weights, which it shares;
    buffers such as RoPE's inverse frequencies stay in their dtype) and is kept for the
    next call: a parameter whose storage or version counter moved (an optimizer step, a LoRA
    update) is cast again, the rest are reused, so decoding during training pays for what changed."""
    if not wants_bf16(model, precision):
        return model
    params = dict(model.named_parameters())
    state = _BF16_COPIES.get(model)
    if state is None or state[0].keys() != params.keys():
        memo = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                for p in params.values() if p.is_floating_point()}
        try:
            copy = deepcopy(model, memo)
        except Exception as exc:  # noqa: BLE001 - a module that cannot be copied decodes as it is
            warnings.warn(f"eval.generate: no bf16 copy of {type(model).__name__} ({type(exc).__name__}: {exc}); "
                          "decoding in its own dtype", stacklevel=3)
            return model
        copy.eval()
        signature = {name: (p.data_ptr(), p._version) for name, p in params.items()}
        _BF16_COPIES[model] = (signature, copy)
        return copy
    signature, copy = state
    copied = dict(copy.named_parameters())
    for name, p in params.items():
        now = (p.data_ptr(), p._version)
        if signature[name] != now:
            with torch.no_grad():
                copied[name].copy_(p.detach())
            signature[name] = now
    return copy


# Per decoding module: its torch.compile'd forward for the one-token steps, or the module itself
# where compiling failed (no C++ compiler, an op dynamo cannot trace): then it runs eagerly.
_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _step_runner(model, compile_steps: bool):
    """What runs a one-token step.  Compiling pays only over many calls on one model: measured on a
    1.3M-parameter random Llama (bench/bench_generate.py's tiny model, batch 4, 64 steps, 1 busy thread)
    a compiled step was 5.5x faster, but compiling took minutes on this shared 2-core CPU; hence off by
    default, for long runs that decode again and again with one model (SDFT rollouts)."""
    if not compile_steps:
        return model
    runner = _COMPILED_STEPS.get(model)
    if runner is None:
        runner = torch.compile(model, dynamic=True)
        _COMPILED_STEPS[model] = runner
    return runner


def _run_step(model, compile_steps: bool, kv_cache, /, **inputs):
    """One step, compiled where asked; on the first failure, warn and fall back to eager for good."""
    step_runner = _step_runner(model, compile_steps)
    if step_runner is model:
        return model(**inputs)
    lengths = [getattr(layer, "length", None) for layer in getattr(kv_cache, "layers", ())]
    try:
        return step_runner(**inputs)
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: decode eagerly
        warnings.warn(f"eval.generate: torch.compile failed ({type(exc).__name__}: {exc}); decoding eagerly",
                      stacklevel=3)
        _COMPILED_STEPS[model] = model
        for layer, length in zip(getattr(kv_cache, "layers", ()), lengths, strict=True):
            if length is not None:
                layer.length = length  # a step that failed half-way must not leave its positions behind
        return model(**inputs)


def generate_ids(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                 stop_ids: Iterable[int], pad_id: int, sampling: Sampling | None = None,
                 batch_size: int = 64, precision: str = "model", compile_steps: bool = False) -> list[list[int]]:
    """Continuations of already-tokenized prompts: for each prompt, the generated token ids in input order, ending with
    the stop token that ended it (one of stop_ids, included) or cut at its budget. Greedy when sampling is None; with
    sampling, draws come from torch.Generator seeded with sampling.seed, so the same prompts/batch/seed give the same ids.

    ``precision`` (keyword, default "model"): "bf16" or "auto" decode in a bf16 copy of the weights (see
    :func:`wants_bf16`, :func:`decoding_model`).  ``compile_steps``: run the one-token steps through
    ``torch.compile`` (see :func:`_step_runner`; falls back to eager with a warning where it fails)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    stop_mask = torch.zeros(vocab, dtype=torch.bool)
    for t in stop_ids:
        if 0 <= int(t) < vocab:
            stop_mask[int(t)] = True
    with cpu_threads_for(model), torch.no_grad():
        return _generate_ids(model, [list(p) for p in prompt_ids], _budgets(max_new_tokens, len(prompt_ids)),
                             stop_mask, int(pad_id), sampling, batch_size, precision=precision,
                             compile_steps=compile_steps)


def _budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    if isinstance(max_new_tokens, int):
        return [max_new_tokens] * n
    budgets = [int(b) for b in max_new_tokens]
    if len(budgets) != n:
        raise ValueError(f"max_new_tokens has {len(budgets)} entries for {n} prompts")
    return budgets


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
    precision: str = "model",
) -> list[str]:
    """Greedy continuations of ``prompts`` (fed verbatim), each cut at EOS or its first newline.

    ``max_new_tokens`` is one int or one per prompt.  Prompts are sorted by token length so
    a batch holds similar lengths (little padding); results come back in input order.
    ``on_batch(n)`` is called after each batch with the number of prompts it finished.

    Chat answers are multi-line: ``stop_at_newline=False`` runs each row to EOS, to one of
    ``stop_token_ids`` (the template's end of turn, e.g. ``<|im_end|>``; like EOS it is not
    part of the text) or to its budget, and returns the whole text.  ``add_special_tokens=False``
    for prompts that already hold their specials (a rendered chat template).  ``sampling``: draw
    tokens (see :class:`Sampling`) instead of argmax.  ``precision``: see :func:`generate_ids`.
    """
    with cpu_threads_for(model), torch.no_grad():
        return _greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_mask, on_batch,
                                stop_at_newline, set(stop_token_ids), add_special_tokens, sampling, precision)


def _greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_mask, on_batch,
                     stop_at_newline=True, stop_token_ids=frozenset(), add_special_tokens=True,
                     sampling=None, precision="model") -> list[str]:
    budgets = _budgets(max_new_tokens, len(prompts))
    if not prompts:
        return []
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    if stop_mask is None:
        vocab = model.get_output_embeddings().weight.shape[0]
        stop_mask = (newline_token_mask(tokenizer, vocab) if stop_at_newline
                     else torch.zeros(vocab, dtype=torch.bool))
    stop_mask = stop_mask.clone()  # EOS ids are added below; leave the caller's mask alone
    eos_ids = eos_token_ids(model, tokenizer) | {int(t) for t in stop_token_ids}
    for eos in eos_ids:
        if eos < stop_mask.numel():
            stop_mask[eos] = True
    ids = _generate_ids(model, encoded, budgets, stop_mask, pad_token_id(tokenizer), sampling, batch_size, on_batch,
                        precision)
    results = []
    for row in ids:
        if row and row[-1] in eos_ids:
            row = row[:-1]  # EOS / end of turn ends the answer but is not part of its text
        text = tokenizer.decode(row, skip_special_tokens=True)
        results.append(text.split("\n", 1)[0] if stop_at_newline else text)
    return results


def _generate_ids(model, encoded: list[list[int]], budgets: list[int], stop_mask: torch.Tensor, pad_id: int,
                  sampling: Sampling | None, batch_size: int, on_batch: Callable[[int], None] | None = None,
                  precision: str = "model", compile_steps: bool = False) -> list[list[int]]:
    if not encoded:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    runner = decoding_model(model, precision)
    device = model_device(runner)
    limit = max_positions(runner)
    stop_mask = stop_mask.to(device)
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling is not None else None
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[list[int]] = [[] for _ in encoded]
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = []
            for i in idx:
                ids = encoded[i]
                if limit is not None and len(ids) + budgets[i] > limit:
                    ids = ids[-max(1, limit - budgets[i]):]  # keep the end of the prompt: it is what is continued
                rows.append(ids)
            generated = _decode_batch(runner, rows, [budgets[i] for i in idx], stop_mask, pad_id, sampling, generator,
                                      compile_steps)
            for i, ids in zip(idx, generated, strict=True):
                results[i] = ids
            if on_batch is not None:
                on_batch(len(idx))
    finally:
        model.train(was_training)
    return results


def _decode_batch(model, rows: list[list[int]], budgets: list[int], stop_mask: torch.Tensor, pad_id: int,
                  sampling: Sampling | None, generator: torch.Generator | None, compile_steps: bool = False) -> list[list[int]]:
    """One left-padded batch: prefill once, then one token per step for every row until all have stopped.

    Everything a step touches is allocated here, before the loop: the 2D attention mask holds
    a column for every position the batch can reach (a step sets one column and passes a view),
    the KV cache is preallocated (eval.kv_cache), and tokens go into one [rows, steps] buffer
    read back once at the end."""
    device = model_device(model)
    n, width, steps = len(rows), max(len(r) for r in rows), max(budgets)
    if steps <= 0:
        return [[] for _ in rows]
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width + steps), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[r, width - len(ids):width] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention[:, :width].cumsum(-1) - 1).clamp(min=0)
    budget = torch.tensor(budgets, device=device)
    cache_name = _cache_kwarg(model)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache = preallocated_cache(width + steps)
    given_cache = {cache_name: cache} if cache is not None else {}

    out = model(input_ids=input_ids, attention_mask=attention[:, :width], position_ids=positions,
                use_cache=True, **given_cache, **keep_last)
    logits = out.logits[:, -1, :]
    if bool(logits.isnan().any()):
        # Seen with eager attention in float64: fully masked padding rows turn into NaN
        # that leaks through the values into the real tokens.
        raise RuntimeError("the model returned NaN logits on a left-padded batch; load it in float32/bfloat16 "
                           "or with attn_implementation='sdpa', or use batch_size=1")
    cache = _returned_cache(out)
    # The one-token steps of a plain Llama / Qwen2 run as straight tensor ops (eval.fast_decode).
    lean = None if compile_steps else LeanDecoder.for_model(model, cache)
    running = budget > 0
    rows_in_batch = None  # None while every row of `generated` is still in the batch; else batch row -> row
    generated = torch.full((n, steps), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    last_pos = positions[:, -1:].clone()
    for step in range(steps):
        token = next_tokens(logits, sampling, generator)
        stopped = stop_mask[token]  # looked up before padding: pad_id need not be a vocabulary entry
        token.masked_fill_(~running, pad_id)
        if rows_in_batch is None:
            generated[:, step] = token
            lengths += running
        else:
            generated[rows_in_batch, step] = token
            lengths.index_add_(0, rows_in_batch, running.long())
        running &= ~stopped
        running &= budget > step + 1
        alive = int(running.sum())  # the step's one read of a tensor value
        if step + 1 == steps or alive == 0:
            break
        if alive < running.numel() and _should_drop_finished(running, cache):
            # Finished rows leave the batch: later steps cost only what is still running.
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows_in_batch = keep if rows_in_batch is None else rows_in_batch[keep]
            token, running, attention = token[keep], running[keep], attention[keep]
            last_pos, budget = last_pos[keep], budget[keep]
        column = width + step
        attention[:, column] = 1
        last_pos += 1
        if lean is not None:
            logits = lean.step(token, last_pos, attention[:, :column + 1])
            continue
        out = _run_step(model, compile_steps, cache, input_ids=token[:, None],
                        attention_mask=attention[:, :column + 1], position_ids=last_pos, use_cache=True,
                        **{cache_name: cache}, **keep_last)
        logits = out.logits[:, -1, :]
    return [generated[r, :length].tolist() for r, length in enumerate(lengths.tolist())]
