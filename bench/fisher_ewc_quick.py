"""Quick, interleaved CPU measurements for the Fisher / EWC targets of issue 3 (the full
benchmarks with CSV output live in bench/bench_fisher.py and bench/bench_ewc.py).

    python -m bench.fisher_ewc_quick [linear] [ewc] [model256] [model64] [--repeats 3] [--threads 1]

Prints medians and ratios of providers timed A B C A B C ... so that load from other
processes hits all of them alike.  Peak memory is tensor memory seen by the dispatcher
(bench.harness.TensorMemoryTracker).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from bench.harness import TensorMemoryTracker
from kernels import backend
from kernels.ewc import ewc_step
from kernels.fisher import linear_grad_and_fisher


def interleaved(providers: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per provider; each provider is (setup or None, run)."""
    times: dict[str, list[float]] = {k: [] for k in providers}
    for round_ in range(warmup + repeats):
        for name, (setup, run) in providers.items():
            state = setup() if setup else None
            start = time.perf_counter()
            run(state)
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return {k: statistics.median(v) for k, v in times.items()}


def report(title: str, medians: dict[str, float], ours: str = "ours") -> None:
    print(f"\n{title}")
    for name, t in medians.items():
        ratio = f"  ours/this = {medians[ours] / t:.2f}x" if name != ours else ""
        print(f"  {name:<22s} {t * 1e3:9.1f} ms{ratio}")


def peak_mib(fn) -> float:
    tracker = TensorMemoryTracker()
    with tracker:
        fn()
    return tracker.peak / 2**20


# ------------------------------------------------------------------------- linear
def bench_linear(repeats: int) -> None:
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    n, t, d_in, d_out = 8, 256, 512, 1376
    x = torch.randn(n, t, d_in)
    dy = torch.randn(n, t, d_out)
    layer = extend(nn.Linear(d_in, d_out, bias=False))

    def backpack_setup():
        layer.weight.grad = None
        return (layer(x) * dy).sum()

    def backpack_run(loss):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with backpack(SumGradSquared()):
                loss.backward()

    providers = {
        "ours": (None, lambda _: linear_grad_and_fisher(x, dy)),
        "plain_weight_grad": (None, lambda _: dy.reshape(-1, d_out).t() @ x.reshape(-1, d_in)),
        "backpack_sgs": (backpack_setup, backpack_run),
    }
    with backend.forced("torch"):
        report(f"linear_grad_and_fisher N={n} T={t} {d_in}->{d_out} (grad + Fisher)",
               interleaved(providers, repeats))


# ------------------------------------------------------------------------- model
def build_model(vocab: int = 4096):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


def make_batches(vocab: int, seq: int, sequences: int = 24, batch: int = 8) -> list[dict]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(0, sequences, batch):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[:, seq - seq // 4:] = 0  # a quarter of each row is padding
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def summed_nll(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                       ignore_index=-100, reduction="sum")


def bench_model(seq: int, repeats: int, loop: bool) -> None:
    from trainer.fisher import estimate_fisher

    model = build_model()
    batches = make_batches(4096, seq)
    params = [p for p in model.parameters() if p.requires_grad]

    def clear():
        for p in params:
            p.grad = None

    def plain(_=None):
        for b in batches:
            summed_nll(model, b).backward()

    def per_sample_loop(_=None):
        fisher = [torch.zeros_like(p) for p in params]
        for b in batches:
            for i in range(b["input_ids"].shape[0]):
                clear()
                summed_nll(model, {k: v[i:i + 1] for k, v in b.items()}).backward()
                for f, p in zip(fisher, params, strict=True):
                    f.addcmul_(p.grad, p.grad)
        return fisher

    providers = {"ours": (None, lambda _: estimate_fisher(model, batches)),
                 "plain_fwd_bwd": (lambda: clear(), plain)}
    if loop:
        providers["per_sample_loop"] = (None, per_sample_loop)
    with backend.forced("torch"):
        report(f"estimate_fisher, 24 seqs x T={seq}, Llama 4x512 ff1376 V4096, batch 8",
               interleaved(providers, repeats))
        if not loop:
            clear()
            ours_mem = peak_mib(lambda: estimate_fisher(model, batches))
            clear()
            plain_mem = peak_mib(plain)
            clear()
            print(f"  peak tensor memory: ours {ours_mem:.0f} MiB, plain {plain_mem:.0f} MiB "
                  f"-> {ours_mem / plain_mem:.2f}x")


# ------------------------------------------------------------------------- EWC
def bench_ewc(repeats: int) -> None:
    model = build_model()
    params = [p for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    anchors = [p.detach() + 0.01 * torch.randn(p.shape, generator=gen) for p in params]
    fishers = [torch.rand(p.shape, generator=gen) for p in params]
    lam = 0.5

    def zero():
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()

    def autograd_penalty(_):
        penalty = sum((lam / 2) * (f * (p - a) ** 2).sum() for p, a, f in zip(params, anchors, fishers,
                                                                                 strict=True))
        penalty.backward()

    providers = {"ours": (zero, lambda _: ewc_step(params, anchors, fishers, lam)),
                 "autograd_penalty": (zero, autograd_penalty)}
    with backend.forced("torch"):
        numel = sum(p.numel() for p in params)
        report(f"EWC step over all {numel / 1e6:.1f}M params of the Llama 4x512",
               interleaved(providers, repeats * 3))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("parts", nargs="*", default=["linear", "ewc", "model256", "model64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 is steadier on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for part in args.parts:
        if part == "linear":
            bench_linear(args.repeats)
        elif part == "ewc":
            bench_ewc(args.repeats)
        elif part == "model256":
            bench_model(256, args.repeats, loop=False)
        elif part == "model64":
            bench_model(64, args.repeats, loop=True)
        else:
            raise SystemExit(f"unknown part {part!r}: linear | ewc | model256 | model64")


if __name__ == "__main__":
    main()
