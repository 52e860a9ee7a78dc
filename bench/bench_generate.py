"""``python -m bench generate``: eval.generate's sampler against HF ``model.generate`` (and llama.cpp).

Same model, same prompts (random token ids, ``--prompt-len`` long), same settings (greedy, the
model's EOS as the stop, ``--new-tokens`` each): for every batch size the two sides run in turn
in one process, alternating which goes first, ``--repeats`` timed rounds after one warm-up each.
Tokens/s counts the tokens each row produced up to and including its stop (HF's padding after a
stop is not counted). Greedy outputs are compared row by row and every mismatch is reported with
its first differing step. llama.cpp (``llama-cpp-python``) decodes the same GGUF at batch 1 when it
is installed and the model came from a GGUF; otherwise its row is skipped with the reason.

Defaults: a tiny random Llama (a smoke test of the harness, seconds). The issue's numbers:
``python -m bench generate --model smollm2-135m-instruct`` (batch 1 and 16, 64-token prompts,
128 new tokens) on an idle machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.generate import PRECISIONS, decoding_model, generate_ids, wants_bf16


@dataclass
class SideResult:
    name: str
    batch: int
    tokens_per_s: list[float]

    def summary(self) -> str:
        rates = self.tokens_per_s
        if not rates:
            return f"{self.name:10s} batch {self.batch:3d}: not run"
        spread = f"{min(rates):8.1f} .. {max(rates):8.1f}"
        return f"{self.name:10s} batch {self.batch:3d}: median {statistics.median(rates):8.1f} tok/s  ({spread}, n={len(rates)})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench generate", description=__doc__.split("\n\n")[1])
    parser.add_argument("--model", default="tiny",
                        help="tiny (random Llama, default), or a name/dir/GGUF for eval.model_source.resolve_model "
                             "(e.g. smollm2-135m-instruct)")
    parser.add_argument("--batch", type=int, action="append", default=None, help="repeatable; default 1 and 16")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per side and batch size")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="both sides decode in this precision (auto: bf16 on a CPU with native bf16, "
                             "else the model's float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--compile", action="store_true",
                        help="ours with compile_steps=True (torch.compile'd one-token steps; the compile is "
                             "timed apart, in the warm-up)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even where it is installed")
    parser.add_argument("--hf-attention-form", action="store_true",
                        help="bf16: ours runs attention with one query position per head, as HF does "
                             "(eval.fast_decode.GROUP_QUERIES off): slower, outputs HF's bit for bit")
    return parser.parse_args(argv)


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), None


def load_model(spec: str):
    """(model, GGUF path or None): the model in float32, and the GGUF it came from when there is one."""
    if spec == "tiny":
        return tiny_model()
    from transformers import AutoModelForCausalLM

    from eval.model_source import REGISTERED_MODELS, resolve_model

    path = resolve_model(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gguf = None
    if spec.lower().endswith(".gguf"):
        gguf = Path(spec)
    elif spec in REGISTERED_MODELS:
        entry = REGISTERED_MODELS[spec]
        found = importlib.util.find_spec(entry.package)
        if found is not None and found.submodule_search_locations:
            gguf = Path(found.submodule_search_locations[0]) / entry.gguf_file
    return model, gguf


def eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = model.config.eos_token_id if eos is None else eos
    return sorted({eos} if isinstance(eos, int) else set(eos or ()))


def random_prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=generator).tolist()


def run_ours(model, prompts, new_tokens, stops, pad_id, precision, compile_steps=False) -> list[list[int]]:
    return generate_ids(model, prompts, new_tokens, stop_ids=stops, pad_id=pad_id, batch_size=len(prompts),
                        precision=precision, compile_steps=compile_steps)


def run_hf(runner, prompts, new_tokens, stops, pad_id) -> list[list[int]]:
    """HF generate on the same batch (all prompts are the same length: no padding), cut after each stop."""
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = runner.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=stops or None, pad_token_id=pad_id)[:, ids.shape[1]:].tolist()
    cut = []
    for row in out:
        ends = [k for k, t in enumerate(row) if t in stops]
        cut.append(row[:ends[0] + 1] if ends else row)
    return cut


def mismatches(ours: list[list[int]], theirs: list[list[int]]) -> list[str]:
    found = []
    for r, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            step = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            found.append(f"row {r}: first difference at step {step} (lengths {len(a)} vs {len(b)})")
    return found


def llama_cpp_rate(gguf: Path | None, prompt: list[int], new_tokens: int, threads: int, repeats: int
                   ) -> tuple[list[float], str]:
    """llama.cpp tokens/s at batch 1 on the GGUF (greedy), or ([], why it was skipped)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return [], "llama-cpp-python is not installed (pip install llama-cpp-python)"
    if gguf is None or not gguf.is_file():
        return [], "no GGUF file for this model"
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                          n_batch=max(64, len(prompt)), verbose=False)
    rates = []
    for round_ in range(repeats + 1):  # the first round warms up
        llm.reset()
        start, produced = time.perf_counter(), 0
        for _ in llm.generate(prompt, temp=0.0, reset=True):
            produced += 1
            if produced >= new_tokens:
                break
        if round_:
            rates.append(produced / (time.perf_counter() - start))
    return rates, f"GGUF {gguf.name} (its own quantised weights, {threads} threads)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hf_attention_form:
        import eval.fast_decode

        eval.fast_decode.GROUP_QUERIES = False
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            print(f"bench generate: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        model, gguf = load_model(args.model)
    except (ValueError, OSError) as exc:
        print(f"bench generate: --model {args.model}: {exc}", file=sys.stderr)
        return 2
    batches = args.batch or [1, 16]
    stops, pad_id = eos_ids(model), int(model.config.pad_token_id or 0)
    bf16 = wants_bf16(model, args.precision)
    runner = decoding_model(model, args.precision)  # HF decodes the very weights ours does
    form = ", HF's attention form" if args.hf_attention_form else ""
    print(f"bench generate: model {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params{form}, "
          f"{'bf16' if bf16 else next(runner.parameters()).dtype} decoding, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, prompts {args.prompt_len} tokens, {args.new_tokens} new, "
          f"stop {stops}", flush=True)
    results: list[SideResult] = []
    all_identical = True
    for batch in batches:
        prompts = random_prompts(model.config.vocab_size, batch, args.prompt_len, seed=batch)
        sides = {
            "ours": lambda p=prompts: run_ours(model, p, args.new_tokens, stops, pad_id, args.precision,
                                               args.compile),
            "hf": lambda p=prompts: run_hf(runner, p, args.new_tokens, stops, pad_id),
        }
        outputs = {}
        for name, fn in sides.items():  # warm-up (and compile), and the outputs compared
            start = time.perf_counter()
            outputs[name] = fn()
            print(f"   {name} warm-up {time.perf_counter() - start:.1f} s", flush=True)
        bad = mismatches(outputs["ours"], outputs["hf"])
        all_identical &= not bad
        print(f"batch {batch}: greedy outputs {'identical' if not bad else f'DIFFER in {len(bad)} rows'}", flush=True)
        for line in bad[:8]:
            print(f"   {line}")
        rates = {name: SideResult(name, batch, []) for name in sides}
        for round_ in range(args.repeats):
            names = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for name in names:
                start = time.perf_counter()
                produced = sum(len(row) for row in sides[name]())
                rates[name].tokens_per_s.append(produced / (time.perf_counter() - start))
        results += rates.values()
        ratio = statistics.median(rates["ours"].tokens_per_s) / statistics.median(rates["hf"].tokens_per_s)
        for side in rates.values():
            print("   " + side.summary(), flush=True)
        print(f"   ours / hf: {ratio:.2f}x (medians)", flush=True)
    if not args.no_llama_cpp and 1 in batches:
        prompt = random_prompts(model.config.vocab_size, 1, args.prompt_len, seed=1)[0]
        rates, note = llama_cpp_rate(gguf, prompt, args.new_tokens, torch.get_num_threads(), args.repeats)
        side = SideResult("llama.cpp", 1, rates)
        print(f"   {side.summary()}  [{note}]", flush=True)
    return 0 if all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
