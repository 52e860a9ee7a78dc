"""Self-replay: the base model's own answers to a bank of generic prompts, as the replay set.

Before training, the base model answers prompts rendered with its chat template; the chats
``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` go to a JSONL file that
the loop reads like any ``replay_data`` file. Replaying the model's own answers keeps its
general behaviour near the base's with no general data at all (self-synthesised rehearsal,
Huang et al. 2024; self-distillation, Yang et al. 2024).

The bank: the built-in ``trainer/self_replay_prompts.jsonl`` (325 generic prompts written for
this project: explanations, how-tos, short writing, lists, definitions, advice, rewriting,
brainstorming, comparisons, small talk; none from an eval suite), plus the user's own
``self_replay_prompts=FILE`` (JSONL rows ``{"prompt": ...}``), duplicates dropped;
``self_replay_samples=N`` draws N of them with a generator seeded by ``seed``.

Call contract (the loop wires it; nothing here touches the loop):

    from trainer.self_replay import self_replay_from_config
    if cfg.replay_data == SELF_REPLAY:        # trainer.config.SELF_REPLAY == "self"
        path, stats = self_replay_from_config(cfg, model, tokenizer)
        # then read_jsonl(path) / tokenize_file(path, ...) exactly as for a replay file

- ``model`` is the **base** model, before ``method.prepare`` adds LoRA layers (its weights
  hash is part of the cache key); any device. It comes back in the mode it was in.
- The file is cached in ``$FORGETLESS_CACHE/self_replay/<key>/replay.jsonl`` (default
  ``~/.cache/forgetless``), built beside and renamed (``trainer.demo.base.build_once``); the
  key hashes the model's weights, the tokenizer, its chat template, the chosen prompts and the
  decoding settings, so a changed model, bank, sample or setting generates anew and an
  unchanged one generates nothing. The count, the time and one sample are logged.
- Under torchrun call it on rank 0, barrier, then read the path on every rank (every rank may
  also call it: the bytes are the same and the rename atomic, but each pays for generation).
- ``DataError`` for a bad prompts file (``FILE:LINE: what``) or when no answer survives.

Degenerate answers are dropped and counted. An answer (stripped of surrounding whitespace) is
- **empty** when nothing is left;
- **repeated** when it is one unit repeated: a single word-or-punctuation token at least 4
  times and nothing else (``"yes yes yes yes"``, ``"!!!!"`` counts each ``!``), or 2 or more
  non-empty lines that are all the same line;
- **runaway** when it has at least 12 tokens (words and punctuation marks, case-folded) and
  some token n-gram with n in 2..4 occurs so often that ``count * n >= half the tokens``
  (the same phrase over most of the answer: ``"I am here. I am here. I am here. ..."``).
Answers that used the whole token budget (re-encoded length >= ``max_new_tokens``, so possibly
cut mid-word) are kept and counted as ``truncated``; each is cut back to its last sentence end
(``.``, ``!`` or ``?`` not after a digit and before whitespace, or a line break) when that keeps at least half of it,
so that the replayed chat does not teach the model to stop mid-sentence (counted as ``trimmed``).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.data import DataError, jsonl_rows

BUILTIN_PROMPTS = Path(__file__).with_name("self_replay_prompts.jsonl")
# Bump when generation or filtering changes what a cached file holds.
SELF_REPLAY_VERSION = 1
_PROMPT_KEYS = {"prompt", "category"}
_TOKEN = re.compile(r"\w+|[^\w\s]")
# Not after a digit: the "2." of a numbered list is no sentence end.
_SENTENCE_END = re.compile(r"(?<!\d)[.!?][\"')\]]*(?=\s|$)|\n")


# ------------------------------------------------------------------------------- the bank


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a JSONL file of ``{"prompt": str}`` rows (``category`` allowed, blank
    lines skipped); ``DataError`` with ``FILE:LINE`` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: self-replay prompts file not found")
    prompts = []
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise DataError(f'{where}: a row must be an object {{"prompt": ...}}, got {type(row).__name__}')
        unknown = set(row) - _PROMPT_KEYS
        if unknown:
            raise DataError(f"{where}: unknown keys {sorted(unknown)}; a row is {{\"prompt\": ...}}")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f'{where}: "prompt" must be a non-empty string, got {prompt!r}')
        prompts.append(prompt.strip())
    if not prompts:
        raise DataError(f"{path}: no prompts (expected JSONL rows {{\"prompt\": ...}})")
    return prompts


def prompt_bank(user_file: str | Path | None = None) -> list[str]:
    """The built-in bank, then the user's prompts; each prompt once, first occurrence kept."""
    prompts = read_prompt_file(BUILTIN_PROMPTS)
    if user_file is not None:
        prompts += read_prompt_file(user_file)
    return list(dict.fromkeys(prompts))


def select_prompts(prompts: list[str], samples: int, seed: int) -> list[str]:
    """``samples`` prompts drawn without replacement by a generator seeded with ``seed``
    (0 or more than the bank = all of them, in bank order)."""
    if samples <= 0 or samples >= len(prompts):
        return list(prompts)
    return random.Random(f"self-replay-{seed}").sample(prompts, samples)


# ------------------------------------------------------------------------------- filtering


def degeneracy(answer: str) -> str | None:
    """``"empty"``, ``"repeated"``, ``"runaway"`` or None (usable); see the module docstring."""
    text = answer.strip()
    if not text:
        return "empty"
    tokens = _TOKEN.findall(text.casefold())
    if len(tokens) >= 4 and len(set(tokens)) == 1:
        return "repeated"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 2 and len(set(lines)) == 1:
        return "repeated"
    if len(tokens) >= 12:
        for n in (2, 3, 4):
            grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
            if grams.most_common(1)[0][1] * n >= len(tokens) / 2:
                return "runaway"
    return None


def trim_to_sentence(answer: str) -> str:
    """``answer`` cut after its last sentence end or line break, if that keeps at least half of
    it; else unchanged (one long unfinished sentence is better kept than lost)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(answer)]
    if ends and ends[-1] >= len(answer) / 2:
        return answer[:ends[-1]].rstrip()
    return answer


# ------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class SelfReplaySettings:
    """How the base answers: greedy (default) or sampled, up to ``max_new_tokens`` each."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 32

    def decoding(self) -> dict:
        """The settings that change the answers (the cache key's part); batch size does not
        change greedy answers, but it does change which draw goes to which row when sampling."""
        if not self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "batch_size": self.batch_size}


@dataclass
class SelfReplayStats:
    prompts: int  # prompts answered
    kept: int  # chats written
    empty: int
    repeated: int
    runaway: int
    truncated: int  # kept, but used the whole token budget
    trimmed: int  # truncated answers cut back to their last sentence end
    seconds: float  # generation time (of the run that built the file)
    cached: bool
    path: str
    sample: dict | None = None  # one kept chat: {"prompt", "answer"}

    @property
    def dropped(self) -> int:
        return self.empty + self.repeated + self.runaway

    def summary(self) -> str:
        where = "from the cache" if self.cached else f"generated in {self.seconds:.1f} s"
        return (f"self-replay: {self.kept} of {self.prompts} answers kept ({where}); dropped {self.dropped} "
                f"({self.empty} empty, {self.repeated} repeated, {self.runaway} runaway); {self.truncated} hit "
                f"the token budget ({self.trimmed} cut back to a sentence end); {self.path}")


def render_prompt(tokenizer, prompt: str) -> str:
    """The user turn plus the assistant header, as the model sees it before answering: the
    tokenizer's chat template, or trainer.data's plain ``user: ...`` layout when it has none."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        # Generation tokenizes with the tokenizer's specials: drop a BOS the template wrote too.
        bos = tokenizer.bos_token
        if bos and text.startswith(bos) and tokenizer.bos_token_id in tokenizer("")["input_ids"]:
            text = text[len(bos):]
        return text
    return f"user: {prompt}\nassistant: "


def generate_answers(model, tokenizer, rendered: list[str], settings: SelfReplaySettings,
                     on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Batched decoding with the KV cache (eval.generate), each answer to EOS or the budget."""
    from eval.generate import Sampling, greedy_generate

    sampling = Sampling(settings.temperature, settings.top_p, settings.seed) if settings.do_sample else None
    return greedy_generate(model, tokenizer, rendered, settings.max_new_tokens, batch_size=settings.batch_size,
                           on_batch=on_batch, stop_at_newline=False, sampling=sampling)


def cache_key(model, tokenizer, prompts: list[str], settings: SelfReplaySettings) -> str:
    from eval.cache import tokenizer_hash
    from trainer.methods import weights_hash

    payload = {"v": SELF_REPLAY_VERSION, "weights": weights_hash(model), "tokenizer": tokenizer_hash(tokenizer),
               "template": getattr(tokenizer, "chat_template", None) or "", "decoding": settings.decoding(),
               "prompts": hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    from trainer.demo.base import default_cache_dir as forgetless_cache

    return forgetless_cache() / "self_replay"


def build_self_replay(
    model,
    tokenizer,
    prompts: list[str],
    settings: SelfReplaySettings,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Path, SelfReplayStats]:
    """The base model's answers to ``prompts`` as a messages-JSONL replay file, and its stats.

    Generated once per cache key (see the module docstring) and read from the cache after.
    """
    from trainer.demo.base import IncompleteCacheError, build_once

    if not prompts:
        raise DataError("self-replay: no prompts to answer")
    final = Path(cache_dir or default_cache_dir()) / cache_key(model, tokenizer, prompts, settings)
    stats_name, replay_name = "stats.json", "replay.jsonl"
    fresh: list[SelfReplayStats] = []

    def build(staging: Path) -> None:
        stats = _generate_and_filter(model, tokenizer, prompts, settings, staging / replay_name, progress)
        stats.path = str(final / replay_name)
        (staging / stats_name).write_text(json.dumps(asdict(stats), indent=2, ensure_ascii=False), encoding="utf-8")
        fresh.append(stats)

    try:
        build_once(final, stats_name, build)
    except IncompleteCacheError as exc:
        raise DataError(f"self-replay cache: {exc}") from None
    if fresh:
        stats = fresh[0]
    else:
        stats = SelfReplayStats(**json.loads((final / stats_name).read_text(encoding="utf-8")))
        stats.cached = True
    log(stats.summary())
    if stats.sample:
        log(f"self-replay sample: {stats.sample['prompt']!r} -> {stats.sample['answer'][:200]!r}")
    return final / replay_name, stats


def _generate_and_filter(model, tokenizer, prompts: list[str], settings: SelfReplaySettings, out: Path,
                         progress: bool) -> SelfReplayStats:
    from tqdm.auto import tqdm

    rendered = [render_prompt(tokenizer, p) for p in prompts]
    bar = tqdm(total=len(prompts), desc="self-replay", unit="prompt", disable=not progress, leave=False)
    started = time.perf_counter()
    try:
        answers = generate_answers(model, tokenizer, rendered, settings, on_batch=bar.update)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    counts = Counter()
    rows, sample = [], None
    for prompt, answer in zip(prompts, answers, strict=True):
        kind = degeneracy(answer)
        if kind is not None:
            counts[kind] += 1
            continue
        answer = answer.strip()
        if len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= settings.max_new_tokens:
            counts["truncated"] += 1
            trimmed = trim_to_sentence(answer)
            counts["trimmed"] += trimmed != answer
            answer = trimmed
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        sample = sample or {"prompt": prompt, "answer": answer}
    if not rows:
        raise DataError(f"self-replay: none of the model's {len(prompts)} answers is usable ({counts['empty']} empty, "
                        f"{counts['repeated']} repeated, {counts['runaway']} runaway); is it an instruct model "
                        f"with a chat template? Use replay_data=FILE instead")
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return SelfReplayStats(prompts=len(prompts), kept=len(rows), empty=counts["empty"], repeated=counts["repeated"],
                           runaway=counts["runaway"], truncated=counts["truncated"], trimmed=counts["trimmed"],
                           seconds=round(seconds, 3),
                           cached=False, path=str(out), sample=sample)


def self_replay_from_config(cfg, model, tokenizer, cache_dir: str | Path | None = None,
                            log: Callable[[str], None] = print) -> tuple[Path, SelfReplayStats]:
    """``build_self_replay`` with the bank, sample and decoding the ``self_replay_*`` keys of a
    TrainConfig name (batch size: ``per_device_eval_batch_size``; seed: ``seed``)."""
    prompts = select_prompts(prompt_bank(cfg.self_replay_prompts), cfg.self_replay_samples, cfg.seed)
    settings = SelfReplaySettings(max_new_tokens=cfg.self_replay_max_new_tokens, do_sample=cfg.self_replay_do_sample,
                                  temperature=cfg.self_replay_temperature, top_p=cfg.self_replay_top_p, seed=cfg.seed,
                                  batch_size=cfg.per_device_eval_batch_size)
    return build_self_replay(model, tokenizer, prompts, settings, cache_dir=cache_dir, progress=cfg.progress, log=log)
