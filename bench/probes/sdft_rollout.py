"""Where an SDFT rollout's time goes: eval.generate's sampler against HF ``generate`` on the same
model (SmolLM2-135M-Instruct with LoRA r16 on every linear layer, B factors nudged off zero so
the adapter is live), the first ``--batch`` flights prompts, ``--new-tokens`` sampled at
temperature 1: sides alternated over ``--rounds`` in one process, then one cProfile of ours.

``OMP_NUM_THREADS=1 taskset -c 0 python -m bench.probes.sdft_rollout [--batch 4] [--new-tokens 24] [--rounds 3]``
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.generate import Sampling, generate_ids
    from eval.model_source import resolve_model
    from kernels import apply_lora
    from trainer.demo.chat_tasks import ensure_chat_task

    model_dir = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    apply_lora(model, r=16, alpha=32)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    rows = [json.loads(line) for line in open(ensure_chat_task("flights").train)][:args.batch]
    prompts = [tok.apply_chat_template(r["messages"][:-1], tokenize=True, add_generation_prompt=True,
                                       return_dict=False) for r in rows]
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def ours():
        generate_ids(model, prompts, args.new_tokens, stop_ids=stop, pad_id=pad, sampling=Sampling(1.0, 1.0, 0),
                     batch_size=args.batch)

    def hf():
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]  # left padding
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=args.new_tokens, do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=sorted(stop))

    print(f"prompt lengths {[len(p) for p in prompts]}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} thread(s)")
    ours(), hf()  # warm-up
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for r in range(args.rounds):
        for name, f in (("ours", ours), ("hf", hf)) if r % 2 == 0 else (("hf", hf), ("ours", ours)):
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    print("  ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)} s" for k, v in times.items()))
    prof = cProfile.Profile()
    prof.enable()
    ours()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(r"fast_decode.py.*\(step\)|modeling_llama.py.*forward|"
                                                             r"next_tokens|torch.mm|_decode_batch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
