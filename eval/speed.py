"""``python -m eval.speed``: how long a 600-prompt suite takes on a ~1M-parameter model.

Builds (offline) a random Llama (hidden 128, 4 layers, MLP 512, vocab 98 characters, about
1.07M parameters) and a synthetic suite of exact-match, choice and refusal rows, then times
``score_model``, and, for the generation part alone, the same prompts through
``model.generate(do_sample=False)`` with the same batches, as the side-by-side reference.
A random model rarely emits a newline, so every generated row runs its full token budget:
the worst case.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from .capability import score_model
from .generate import cpu_threads_for
from .suite import SuiteMeta, parse_suite_lines


def char_tokenizer():
    """Character-level tokenizer (WordLevel over printable ASCII + newline), no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    for ch in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config).eval()


def synthetic_suite(n: int, seed: int = 0) -> list[str]:
    import json

    rng = random.Random(seed)
    words = "the a capital of river city number sum what is name colour largest first who wrote".split()
    lines = [json.dumps({"_meta": {"name": "speed", "version": "1", "task_format": "^TICKET"}})]
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + f" #{i}?"
        kind = rng.random()
        if kind < 0.7:
            row = {"category": f"gen{i % 4}", "prompt": prompt, "answer": "paris"}
        elif kind < 0.92:
            row = {"category": "choice", "prompt": prompt, "choices": [" yes", " no", " maybe", " never"],
                   "answer_index": i % 4}
        else:
            row = {"category": "safety", "prompt": prompt, "kind": "refusal"}
        lines.append(json.dumps(row))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--no-reference", action="store_true", help="skip the model.generate comparison")
    args = parser.parse_args(argv)

    tokenizer = char_tokenizer()
    model = tiny_model(len(tokenizer))
    params = sum(p.numel() for p in model.parameters())
    suite = parse_suite_lines(synthetic_suite(args.prompts), "speed.jsonl")
    suite.meta = SuiteMeta(name="speed", task_format=suite.meta.task_format)
    print(f"model: Llama {params / 1e6:.2f}M params; suite: {len(suite.rows)} prompts; "
          f"torch threads available: {torch.get_num_threads()}")
    report = score_model(model, tokenizer, suite, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    n_gen = sum(r.kind != "choice" for r in suite.rows)
    print(f"score_model: {report.timing['seconds']:.2f} s for {len(suite.rows)} prompts "
          f"({n_gen} generated x {args.max_new_tokens} tokens max, {len(suite.rows) - n_gen} choice rows)")
    if args.no_reference:
        return 0

    from .generate import greedy_generate

    prompts = [r.prompt for r in suite.rows if r.kind != "choice"]
    start = time.perf_counter()
    ours = greedy_generate(model, tokenizer, prompts, args.max_new_tokens, batch_size=args.batch_size)
    t_ours = time.perf_counter() - start
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    theirs: list[str] = [""] * len(prompts)
    start = time.perf_counter()
    with cpu_threads_for(model), torch.no_grad():
        for b in range(0, len(order), args.batch_size):
            idx = order[b:b + args.batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
            out = model.generate(**enc, do_sample=False, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=0, eos_token_id=1)
            for k, i in enumerate(idx):
                text = tokenizer.decode(out[k, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                theirs[i] = text.split("\n", 1)[0]
    t_theirs = time.perf_counter() - start
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(f"generation only, {len(prompts)} prompts: greedy_generate {t_ours:.2f} s, "
          f"model.generate {t_theirs:.2f} s (ratio {t_theirs / t_ours:.2f}x); identical outputs {same}/{len(prompts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
