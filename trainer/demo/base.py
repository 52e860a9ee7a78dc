"""The demo base model: a small Llama pretrained by the project on the synthetic world.

``ensure_base_model()`` builds it once and caches it as a real Hugging Face directory
(``model.safetensors``, ``config.json``, ``generation_config.json``, the demo tokenizer,
plus ``recipe.json`` and ``pretrain_log.json``) under ``~/.cache/forgetless`` (or
``$FORGETLESS_CACHE``), in a folder named after a hash of the recipe, the world version and
:data:`BASE_VERSION`. Any change to one of them builds a new base; nothing is overwritten.

Pretraining is a compact loop of its own (AdamW, linear warmup then cosine decay, gradient
clipping) on the general corpus, tokenized as CONTRACTS.md says: ``prompt + completion +
eos``, loss on the completion and the eos only. Given the recipe it is deterministic: the
weights are seeded, the batches are drawn from a seeded generator.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

# The cache helpers live in eval (which owns model loading and must not import trainer); the
# names stay importable from here.
from eval.model_source import IncompleteCacheError, build_once, default_cache_dir  # noqa: F401
from trainer.demo.tokenizer import build_tokenizer
from trainer.demo.world import WORLD_VERSION, build_world

BASE_VERSION = "1"  # bump when the loop or the model code changes what a recipe produces
IGNORE_INDEX = -100


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that determines the base model's weights (and so its cache key)."""

    world_seed: int = 0
    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Loss on prompt tokens, relative to the completion loss (0 = completion only, as in
    # fine-tuning). Prompts are ordinary text: predicting them teaches the word list and the
    # instruction forms, which the copy-type tasks then rely on.
    prompt_loss_weight: float = 0.25

    @classmethod
    def tiny(cls) -> BaseRecipe:
        """Seconds-scale variant for tests: a 2-layer d=64 model, 100 steps (~5 s on one core)."""
        return cls(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                   steps=100, batch_size=32, lr=1e-2, warmup_steps=10)

    @classmethod
    def named(cls, name: str) -> BaseRecipe:
        recipes = {"default": cls(), "tiny": cls.tiny()}
        if name not in recipes:
            raise ValueError(f"unknown base recipe {name!r}; choose one of {sorted(recipes)}")
        return recipes[name]

    def cache_key(self) -> str:
        blob = json.dumps({"recipe": asdict(self), "base": BASE_VERSION, "world": WORLD_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_config(recipe: BaseRecipe, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def init_model(recipe: BaseRecipe, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """The randomly initialised demo model (seeded), before pretraining."""
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(model_config(recipe, tokenizer))
    # Generation for eval stops at EOS or at the end of the answer line.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("\n")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_rows(rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[tuple[list[int], int]]:
    """(ids of prompt + completion + eos, length of the prompt) per prompt/completion row."""
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    completions = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    return [(p + c + [tokenizer.eos_token_id], len(p)) for p, c in zip(prompts, completions, strict=True)]


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels keep only completion and eos tokens."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lr_at(step: int, recipe: BaseRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine)


@torch.no_grad()
def completion_loss(model: LlamaForCausalLM, examples: list[tuple[list[int], int]], pad_id: int,
                    batch_size: int = 256) -> float:
    """Mean cross-entropy per completion token (completion + eos) over ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(1, count)


def pretraining_loss(model: LlamaForCausalLM, batch: dict[str, torch.Tensor],
                     prompt_loss_weight: float) -> torch.Tensor:
    """Mean NLL of the completion tokens, plus ``prompt_loss_weight`` x that of the prompt tokens."""
    if prompt_loss_weight == 0.0:
        return model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")
    completion = batch["labels"][:, 1:] != IGNORE_INDEX
    prompt = (batch["attention_mask"][:, 1:] == 1) & ~completion
    loss = (nll * completion).sum() / completion.sum().clamp(min=1)
    return loss + prompt_loss_weight * (nll * prompt).sum() / prompt.sum().clamp(min=1)


def length_grouped_batches(lengths: list[int], batch_size: int, steps: int, seed: int,
                           group: int = 8) -> Iterator[list[int]]:
    """``steps`` batches of row indices drawn uniformly at random, with little padding.

    Rows differ in length (2 to ~60 tokens) and a batch is padded to its longest row, so
    ``group`` batches' worth of rows are drawn at once, sorted by length, cut into batches
    and yielded in random order: every row is still drawn uniformly, only the grouping into
    batches follows length (about halves the padded tokens).
    """
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        picks = torch.randint(len(lengths), (group * batch_size,), generator=generator).tolist()
        picks.sort(key=lambda i: lengths[i])
        for b in torch.randperm(group, generator=generator).tolist()[: steps - done]:
            yield picks[b * batch_size : (b + 1) * batch_size]
            done += 1


def pretrain(model: LlamaForCausalLM, examples: list[tuple[list[int], int]], recipe: BaseRecipe,
             pad_id: int, progress: bool = True,
             on_step: Callable[[int, LlamaForCausalLM], None] | None = None) -> list[float]:
    """Train ``model`` in place on ``examples``; returns the loss of every step.

    ``on_step(step, model)``, when given, runs after each optimizer step (e.g. to score a
    checkpoint); the model is in train mode when it is called and must be left so.
    """
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95),
    )
    batches = length_grouped_batches([len(ids) for ids, _ in examples], recipe.batch_size, recipe.steps,
                                     seed=recipe.seed)
    model.train()
    losses: list[float] = []
    bar = tqdm(total=recipe.steps, desc="pretraining demo base", disable=not progress, unit="step")
    for step, picks in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = pretraining_loss(model, collate([examples[i] for i in picks], pad_id), recipe.prompt_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.update(1)
        if step % 10 == 0 or step == recipe.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        if on_step is not None:
            on_step(step, model)
    bar.close()
    model.eval()
    return losses


def build_base_model(out_dir: str | Path, recipe: BaseRecipe, progress: bool = True) -> Path:
    """Build the world, pretrain the base on it and save the HF directory to ``out_dir``."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory(prefix="forgetless-world-") as world_dir:
        world = build_world(world_dir, seed=recipe.world_seed)
        train = encode_rows(read_rows(world.general_train), tokenizer)
        val = encode_rows(read_rows(world.general_val), tokenizer)
    model = init_model(recipe, tokenizer)
    threads = torch.get_num_threads()
    # One thread, as for every small model the trainer runs: the base's matmuls (d <= 128) are
    # too small to split, and on a busy machine waiting threads cost ~10x (measured on 2 shared
    # cores under load: 1.41 steps/s on one thread, 0.13 on two; the weights after 8 steps were
    # bitwise identical either way).
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        losses = pretrain(model, train, recipe, tokenizer.pad_token_id, progress=progress)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    log = {
        "steps": recipe.steps, "seconds": round(seconds, 2), "steps_per_s": round(recipe.steps / seconds, 3),
        "threads": 1, "final_train_loss": losses[-1],
        "val_completion_loss": completion_loss(model, val, tokenizer.pad_token_id),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    (out / "pretrain_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return out


def ensure_base_model(cache_dir: str | Path | None = None, progress: bool = True,
                      recipe: BaseRecipe | str = "default", **overrides) -> Path:
    """Path of the cached demo base for ``recipe``, building it first if it is missing.

    ``recipe`` is a :class:`BaseRecipe` or a name ("default", "tiny"); ``overrides`` replace
    recipe fields (e.g. ``steps=200``) and so change the cache key. The folder appears
    atomically: it is built beside its final place and renamed into it.
    """
    if isinstance(recipe, str):
        recipe = BaseRecipe.named(recipe)
    recipe = replace(recipe, **overrides)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"base-{recipe.cache_key()}"
    build_once(final, "config.json", lambda staging: build_base_model(staging, recipe, progress=progress))
    return final
