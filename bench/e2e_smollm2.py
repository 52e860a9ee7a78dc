"""End to end at a real model's shape: ``python -m bench e2e --shape smollm2-135m``.

A randomly initialised ``LlamaForCausalLM`` with SmolLM2-135M's config (30 layers, width 576,
9 heads / 3 KV heads, MLP 1536, vocabulary 49,152, tied embeddings, rope theta 100,000, 8,192
positions; 134.5M parameters; no download: the weights do not change the speed) and a
49,152-word synthetic tokenizer (``w<id>`` words, one token each, so row lengths are exact).

Kernels (providers; ``ours`` is ``trainer.loop.train``, what ``python -m trainer.run`` runs):

* ``sm2_lora``: ``ours`` (method=lora, r=16, alpha=32, every linear of the blocks) against
  ``hf_peft`` (HF Trainer over ``get_peft_model(..., target_modules="all-linear")``);
* ``sm2_full``: ``ours`` (method=full) against ``hf_trainer`` (HF Trainer, full fine-tuning);
* each at batch 8 x 256 and 8 x 512 (rows of random words longer than ``max_length``, so every
  batch is exactly batch x seq tokens, no padding), in bf16 autocast on both sides (ours
  ``bf16=true``, HF ``bf16=True``: fp32 master weights on both) and in fp32 on both sides;
  tokens/s (median over the timed steps), peak memory (one 2-step run each under the
  harness's tensor-memory tracker, model loading included), and ``peak_share``: the share of
  this machine's GEMM peak in that precision that the side's tokens/s amount to;
* ``sm2_ewc``: ``ours`` = method=ewc against ``full`` = ours' method=full, step time, measured
  interleaved in the same rounds as ``sm2_full`` at 8 x 512 (``sm2_lora_ewc``: lora_ewc against
  lora likewise); the Fisher pass before training is outside the timed steps;
* ``sm2_packing``: a mixed-length chat set (prompt/completion rows of ~50 tokens, 20% replay
  rows of ~150), batch 8: ``ours`` = ``packing=true`` against ``padded`` = ``packing=false``,
  real (non-padding) tokens/s; both train on the very same rows (same seed, same plan), whose
  real token counts come from the trainer's own plan (``trainer.data.plan_batches``);
* ``gemm_peak``: ``torch.matmul`` of 4096x576 by 576x1536 (the MLP's up projection over 8 x
  512 tokens) in fp32 and in bf16, GFLOP/s, measured once per run.

FLOPs per token, for ``peak_share`` (N = parameters that take part in a matmul: the blocks'
projections plus the LM head, 134.5M for SmolLM2 whose head is the tied embedding; L layers,
H x Q = heads x head dim, T = sequence length, r = LoRA rank):

* full fine-tuning: ``6 N + 12 L H Q T`` (PaLM's model-FLOPs formula, appendix B: forward
  2N, backward 4N; attention's QK^T and AV 4 L H Q T forward, twice that backward);
* LoRA: ``4 N + 6 r S + 12 L H Q T`` with S = sum of (in + out) over the adapted linears: a
  frozen base costs its forward (2N) and the input-gradient half of its backward (2N), no
  weight gradients; each adapter costs forward 2r(in + out), backward 4r(in + out) (input and
  factor gradients). Attention's backward is the same as for full fine-tuning.

``peak_share = tokens/s x FLOPs/token / GEMM peak``: how much of what this CPU's matmuls can do
a side turns into training, in the precision it runs.

Runs alternate A B A B (2 rounds; the order reversed every other round); a step's time is the
gap between consecutive ``on_step_end`` callbacks; the first ``warm`` steps of each run are
warm-up. ``--repeats N`` sets the timed steps per run to ``clamp(N // 2, 2, 6)`` (3 by default).
A side that cannot run yet (a config key or feature not in this checkout, or an error) is
noted as "ours not ready" with the error and its rows are left out; the peers still run.
On CUDA (``bench/gpu_check.sh``) only bf16 at 8 x 512 runs, with HF Trainer + Liger-Kernel
(``use_liger_kernel=True``) as a further peer when ``liger_kernel`` is importable.
"""
from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.harness import BenchContext, Quantiles, Target

SHAPE_NAME = "smollm2-135m"
LORA_R = 16
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GEMM = (4096, 576, 1536)  # M x K @ K x N: 8 x 512 tokens through the MLP's up projection

K_LORA, K_FULL, K_EWC, K_LORA_EWC, K_PACK, K_GEMM = (
    "sm2_lora", "sm2_full", "sm2_ewc", "sm2_lora_ewc", "sm2_packing", "gemm_peak")

TARGETS = [
    Target("issue 13: LoRA bf16 tokens/s >= 1.3x HF Trainer + PEFT, 8x512", K_LORA, "throughput", "hf_peft",
           config_contains="prec=bf16 batch=8x512", min_ratio=1.3),
    Target("issue 13: LoRA bf16 peak memory <= 0.6x HF Trainer + PEFT, 8x512", K_LORA, "memory", "hf_peft",
           config_contains="prec=bf16 batch=8x512", max_ratio=0.6),
    Target("issue 13: LoRA fp32 tokens/s >= 1.3x HF Trainer + PEFT, 8x512", K_LORA, "throughput", "hf_peft",
           config_contains="prec=fp32 batch=8x512", min_ratio=1.3),
    Target("issue 13: LoRA fp32 peak memory <= 0.6x HF Trainer + PEFT, 8x512", K_LORA, "memory", "hf_peft",
           config_contains="prec=fp32 batch=8x512", max_ratio=0.6),
    Target("issue 13: full bf16 tokens/s >= 1.15x HF Trainer, 8x512", K_FULL, "throughput", "hf_trainer",
           config_contains="prec=bf16 batch=8x512", min_ratio=1.15),
    Target("issue 13: full bf16 peak memory <= 0.7x HF Trainer, 8x512", K_FULL, "memory", "hf_trainer",
           config_contains="prec=bf16 batch=8x512", max_ratio=0.7),
    Target("issue 13: ewc step time <= 1.05x full", K_EWC, "time", "full", max_ratio=1.05),
    Target("issue 13: lora_ewc step time <= 1.05x lora", K_LORA_EWC, "time", "lora", max_ratio=1.05),
    Target("issue 13: packing real tokens/s >= 1.5x padded, mixed-length chat set", K_PACK, "throughput",
           "padded", min_ratio=1.5),
]


class OursNotReady(RuntimeError):
    """Our trainer in this checkout cannot run the configuration yet (the message says why)."""


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True
    rope_theta: float = 100000.0
    max_positions: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one block's projections, in ALL_LINEAR's order."""
        h, q, kv, ff = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, ff), (h, ff), (ff, h)]

    @property
    def matmul_params(self) -> int:
        """N: weights that take part in a matmul (the blocks' projections and the LM head)."""
        return self.layers * sum(i * o for i, o in self.linears()) + self.hidden * self.vocab

    def flops_per_token(self, method: str, seq: int, r: int = LORA_R) -> float:
        attention = 12 * self.layers * self.heads * self.head_dim * seq
        if method in ("full", "ewc"):
            return 6 * self.matmul_params + attention
        adapters = self.layers * sum(i + o for i, o in self.linears())
        return 4 * self.matmul_params + 6 * r * adapters + attention

    def describe(self) -> str:
        return (f"L={self.layers} d={self.hidden} ff={self.intermediate} h={self.heads}/{self.kv_heads} "
                f"V={self.vocab}{' tied' if self.tied else ''}")


SMOLLM2_135M = ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152)
# --quick: the same structure (GQA 3:1, tied head), tiny, so CI checks every code path in seconds.
QUICK_SHAPE = ModelShape(layers=2, hidden=48, intermediate=96, heads=3, kv_heads=1, vocab=512, max_positions=256)
SPECIALS = ("<unk>", "<pad>", "</s>")


def build_model(shape: ModelShape, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied, rope_theta=shape.rope_theta, max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, mlp_bias=False,
        pad_token_id=1, eos_token_id=2, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_tokenizer(vocab: int):
    """Whitespace-split words ``w3 .. w<vocab-1>``, one token each (ids 0-2 are the specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(SPECIALS)}
    words.update({f"w{i}": i for i in range(len(SPECIALS), vocab)})
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(len(SPECIALS), vocab)}" for _ in range(n))


def write_model_dir(root: Path, shape: ModelShape) -> Path:
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        build_model(shape).save_pretrained(str(model_dir), safe_serialization=True)
        build_tokenizer(shape.vocab).save_pretrained(str(model_dir))
    return model_dir


def write_long_rows(path: Path, rows: int, seq: int, vocab: int, seed: int = 7) -> Path:
    """Text rows of 2 x seq words: every one is cut to exactly ``seq`` tokens by both trainers."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": _words(rng, 2 * seq, vocab)}) + "\n")
    return path


def write_chat_rows(path: Path, rows: int, prompt: tuple[int, int], completion: tuple[int, int], vocab: int,
                    seed: int) -> Path:
    """Prompt/completion rows with (mean, spread) word counts: loss on the completion only."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(rows):
            n_p = max(1, prompt[0] + rng.randint(-prompt[1], prompt[1]))
            n_c = max(1, completion[0] + rng.randint(-completion[1], completion[1]))
            fh.write(json.dumps({"prompt": _words(rng, n_p, vocab), "completion": _words(rng, n_c, vocab)}) + "\n")
    return path


# ----------------------------------------------------------------------------- the runners
@dataclass(frozen=True)
class Case:
    method: str  # lora | full | ewc | lora_ewc
    precision: str  # bf16 | fp32 | auto (our default; the peer is never run at "auto")
    batch: int
    seq: int

    @property
    def config(self) -> str:
        return f"method={self.method} prec={self.precision} batch={self.batch}x{self.seq}"


def _our_config(values: dict) -> dict:
    """``values`` minus keys this checkout's TrainConfig does not have yet, where leaving one out
    changes nothing (``packing=false`` is what a trainer without the key does); any other
    missing key means ours cannot run this case yet."""
    from trainer.config import field_types

    known = field_types()
    out = {}
    for key, value in values.items():
        if key in known:
            out[key] = value
        elif key == "packing" and value == "false":
            continue
        else:
            raise OursNotReady(f"this checkout's trainer has no config key {key!r} (wanted {key}={value})")
    return out


def packing_wired() -> bool:
    """Whether the training loop uses trainer.packing: some trainer module other than packing.py
    imports it (read from the sources: a packed run on a loop that ignores the key would
    silently time padded batches)."""
    import trainer

    imports = re.compile(r"^\s*(from trainer\.packing import|import trainer\.packing|from trainer import .*\bpacking\b)",
                         re.MULTILINE)
    return any(imports.search(path.read_text(encoding="utf-8"))
               for path in Path(trainer.__file__).parent.glob("*.py") if path.name != "packing.py")


def run_ours(model_dir: Path, data: Path, out: Path, case: Case, steps: int, device: torch.device,
             on_step: Callable[[], None] | None = None, extra: dict | None = None) -> None:
    from trainer.config import build_config
    from trainer.loop import train

    values = dict(
        model=str(model_dir), method=case.method, data=str(data), validation_split=0.0, output_dir=str(out),
        per_device_train_batch_size=case.batch, max_length=case.seq, max_steps=steps, learning_rate=1e-4,
        lr_scheduler_type="linear", lora_r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, max_grad_norm=1.0,
        save_steps=0, logging_steps=1000, progress=False, device=device.type, packing="false",
        bf16={"bf16": "true", "fp32": "false", "auto": "auto"}[case.precision],
    )
    if case.method in ("ewc", "lora_ewc"):
        # The Fisher pass runs before the first step (outside the timing); a few rows keep it short.
        values.update(fisher_data=str(data), fisher_samples=case.batch)
    values.update(extra or {})
    try:
        cfg = build_config(_our_config(values))
    except OursNotReady:
        raise
    except Exception as exc:  # a value this checkout rejects
        raise OursNotReady(f"config rejected: {exc}") from exc
    train(cfg, on_step_end=(lambda step, record: on_step()) if on_step else None)


def run_hf(model_dir: Path, data: Path, out: Path, case: Case, steps: int, device: torch.device,
           on_step: Callable[[], None] | None = None, liger: bool = False) -> None:
    """HF Trainer (+ PEFT LoRA r16 all-linear for method=lora), same data, schedule and clipping."""
    from bench.bench_e2e import hf_trainer_run

    hf_trainer_run(model_dir, data, out, batch=case.batch, seq=case.seq, steps=steps, device=device,
                   lora_r=LORA_R if case.method == "lora" else None, dropout=0.0,
                   bf16=case.precision == "bf16", on_step=on_step, liger=liger)


# ----------------------------------------------------------------------------- measuring
def gemm_peak(ctx: BenchContext) -> dict[str, float]:
    """GFLOP/s of one ``GEMM``-shaped matmul per precision (median of timed calls)."""
    m, k, n = (512, 576, 1536) if ctx.quick else GEMM
    reps = 3 if ctx.quick else 15
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(m, k, generator=gen).to(ctx.device, dtype)
        b = torch.randn(k, n, generator=gen).to(ctx.device, dtype)
        samples = []
        for i in range(reps + 3):
            ctx.sync()
            start = time.perf_counter()
            torch.matmul(a, b)
            ctx.sync()
            if i >= 3:
                samples.append(2 * m * k * n / (time.perf_counter() - start) / 1e9)
        q = Quantiles.of(samples)
        peaks[name] = q.p50
        ctx.add(K_GEMM, "torch.matmul", "forward", "gflops", "shape", f"{m}x{k}@{k}x{n}", q, f"dtype={name}")
    print(f"  {K_GEMM}: fp32 {peaks['fp32']:,.0f} GFLOP/s, bf16 {peaks['bf16']:,.0f} GFLOP/s "
          f"({m}x{k} @ {k}x{n})", flush=True)
    return peaks


def _peak_mib(ctx: BenchContext, fn: Callable[[], None]) -> float:
    from bench.bench_e2e import _run_peak_mib

    return _run_peak_mib(ctx, fn)


def interleave(ctx: BenchContext, label: str, runners: dict[str, Callable], warm: int, timed: int,
               rounds: int) -> dict[str, list[float]]:
    """Step times (ms) per provider over ``rounds`` A B A B rounds; a provider that raises is
    noted and dropped (its samples so far too), the others go on."""
    step_ms: dict[str, list[float]] = {name: [] for name in runners}
    alive = dict(runners)
    for round_index in range(rounds):
        order = list(alive) if round_index % 2 == 0 else list(reversed(alive))
        for name in order:
            stamps: list[float] = []
            try:
                alive[name](warm + timed, lambda stamps=stamps: (ctx.sync(), stamps.append(time.perf_counter())))
            except Exception as exc:
                what = (f"ours not ready: {name}" if name.startswith("ours") or name == "padded"
                        else f"{name} failed")
                ctx.note(f"{label}: {what}, left out ({type(exc).__name__}: {str(exc)[:300]})")
                alive.pop(name)
                step_ms.pop(name)
                continue
            gaps = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:], strict=False)]
            step_ms[name] += gaps[warm - 1:]
    return step_ms


def _add_step_rows(ctx: BenchContext, kernel: str, name: str, samples: list[float], tokens: int,
                   config: str) -> Quantiles:
    q = Quantiles.of(samples)
    throughput = Quantiles(tokens / q.p50 * 1e3, tokens / q.p80 * 1e3, tokens / q.p20 * 1e3)
    ctx.add(kernel, name, "full", "throughput", "tokens", tokens, throughput, config)
    ctx.add(kernel, name, "full", "time", "tokens", tokens, q, config)
    return throughput


def bench_case(ctx: BenchContext, root: Path, model_dir: Path, shape: ModelShape, case: Case, with_ewc: bool,
               peaks: dict[str, float], warm: int, timed: int, rounds: int) -> None:
    kernel, peer = (K_LORA, "hf_peft") if case.method == "lora" else (K_FULL, "hf_trainer")
    ewc_method, ewc_kernel = ("lora_ewc", K_LORA_EWC) if case.method == "lora" else ("ewc", K_EWC)
    data = write_long_rows(root / f"rows-{case.seq}.jsonl", case.batch * (warm + timed) * 2, case.seq, shape.vocab)
    config = f"{case.config} {shape.describe()} r={LORA_R}"
    print(f"  {kernel} ({config})", flush=True)
    out = root / "out"
    ewc_case = Case(ewc_method, case.precision, case.batch, case.seq)
    runners: dict[str, Callable] = {
        "ours": lambda steps, on_step: run_ours(model_dir, data, out / f"ours-{case.method}", case, steps,
                                                ctx.device, on_step),
        peer: lambda steps, on_step: run_hf(model_dir, data, out / peer, case, steps, ctx.device, on_step),
    }
    if ctx.device.type == "cuda" and _liger_available():
        runners[f"{peer}_liger"] = lambda steps, on_step: run_hf(model_dir, data, out / f"{peer}-liger", case, steps,
                                                                 ctx.device, on_step, liger=True)
    if with_ewc:
        runners[f"ours_{ewc_method}"] = lambda steps, on_step: run_ours(
            model_dir, data, out / f"ours-{ewc_method}", ewc_case, steps, ctx.device, on_step)
    step_ms = interleave(ctx, f"{kernel} {case.config}", runners, warm, timed, rounds)
    tokens = case.batch * case.seq
    flops = shape.flops_per_token(case.method, case.seq)
    peak = peaks[case.precision if case.precision in peaks else "fp32"]
    shares = []
    for name in [n for n in (peer, f"{peer}_liger", "ours") if n in step_ms]:
        throughput = _add_step_rows(ctx, kernel, name, step_ms[name], tokens, config)
        share = throughput.p50 * flops / (peak * 1e9)
        ctx.add(kernel, name, "full", "peak_share", "tokens", tokens, Quantiles.single(share), config)
        shares.append(f"{name} {throughput.p50:,.0f} tok/s = {share:.1%} of the {case.precision} GEMM peak")
    print(f"    {'; '.join(shares)} ({flops / 1e6:,.3g} MFLOP/token)", flush=True)
    ewc_name = f"ours_{ewc_method}"
    if ewc_name in step_ms and "ours" in step_ms:
        ewc_config = f"{ewc_case.config} {shape.describe()}"
        _add_step_rows(ctx, ewc_kernel, "ours", step_ms[ewc_name], tokens, ewc_config)
        _add_step_rows(ctx, ewc_kernel, case.method, step_ms["ours"], tokens, ewc_config)
    for name in [n for n in ("ours", peer, f"{peer}_liger") if n in step_ms]:
        try:
            mib = _peak_mib(ctx, lambda name=name: runners[name](2, None))
        except Exception as exc:
            ctx.note(f"{kernel} {case.config}: {name} memory run failed ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        ctx.add(kernel, name, "full", "memory", "tokens", tokens, Quantiles.single(mib), config)


def _liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def bench_packing(ctx: BenchContext, root: Path, model_dir: Path, shape: ModelShape, warm: int, timed: int,
                  rounds: int) -> None:
    """Packed against padded batches on a mixed-length chat set, same rows, real tokens/s."""
    from transformers import AutoTokenizer

    from trainer.data import plan_batches, tokenize_file

    batch, replay_ratio, max_length = (4, 0.25, 64) if ctx.quick else (8, 0.2, 256)
    short, long = (((4, 1), (6, 2)), ((10, 2), (20, 4))) if ctx.quick else (((20, 5), (30, 8)), ((50, 10), (100, 20)))
    steps = warm + timed
    task = write_chat_rows(root / "chat-task.jsonl", 4 * batch * steps, *short, shape.vocab, seed=11)
    replay = write_chat_rows(root / "chat-long.jsonl", batch * steps, *long, shape.vocab, seed=12)
    case = Case("lora", "auto", batch, max_length)
    config = (f"method=lora prec=auto batch={batch} mixed: task ~{short[0][0] + short[1][0]} tokens, "
              f"{replay_ratio:.0%} replay ~{long[0][0] + long[1][0]} {shape.describe()}")
    print(f"  {K_PACK} ({config})", flush=True)
    extra = dict(replay_data=str(replay), replay_ratio=replay_ratio)
    runners: dict[str, Callable] = {
        "padded": lambda steps, on_step: run_ours(model_dir, task, root / "out" / "padded", case, steps, ctx.device,
                                                  on_step, extra={**extra, "packing": "false"}),
    }
    if packing_wired():
        runners["ours"] = lambda steps, on_step: run_ours(model_dir, task, root / "out" / "packed", case, steps,
                                                          ctx.device, on_step, extra={**extra, "packing": "true"})
    else:
        ctx.note(f"{K_PACK}: ours not ready: packing=true, but trainer.loop does not call trainer.packing "
                 "yet; only the padded side ran")
    step_ms = interleave(ctx, K_PACK, runners, warm, timed, rounds)
    # Real tokens of each step, from the plan both runs follow (validation_split=0, seed 0).
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    sources = {0: tokenize_file(task, tokenizer, max_length).examples,
               1: tokenize_file(replay, tokenizer, max_length).examples}
    plan = plan_batches(len(sources[0]), len(sources[1]), replay_ratio, batch, steps, seed=0)
    real = [sum(len(sources[s][i].input_ids) for s, i in rows) for rows in plan]
    padded = [batch * max(len(sources[s][i].input_ids) for s, i in rows) for rows in plan]
    # Gap g (0-based) of a run is step g + 1; the kept gaps are warm - 1 .. steps - 2, per round.
    step_of_sample = [g + 1 for g in range(warm - 1, steps - 1)]
    for name, samples in step_ms.items():
        per_step = [real[step_of_sample[i % len(step_of_sample)]] / ms * 1e3 for i, ms in enumerate(samples)]
        ctx.add(K_PACK, name, "full", "throughput", "rows", f"{batch} mixed", Quantiles.of(per_step), config)
        ctx.add(K_PACK, name, "full", "time", "rows", f"{batch} mixed", Quantiles.of(samples), config)
    share = 1 - sum(real[1:]) / sum(padded[1:])
    print(f"    real tokens per step {sum(real) / len(real):,.0f}; padded batches would hold "
          f"{sum(padded) / len(padded):,.0f} ({share:.0%} padding)", flush=True)


def run(ctx: BenchContext, root: Path) -> None:
    shape = QUICK_SHAPE if ctx.quick else SMOLLM2_135M
    batch, seqs = (2, (32,)) if ctx.quick else (8, (512, 256))  # the targets' 8 x 512 first
    if ctx.seqs and not ctx.quick:
        seqs = tuple(ctx.seqs)
    precisions = ("bf16", "fp32")
    if ctx.device.type == "cuda" and not ctx.quick:
        # bench/gpu_check.sh: the GPU's time is short; bf16 at the targets' shape is what matters there.
        seqs, precisions = (512,), ("bf16",)
    warm, timed, rounds = (1, 2, 1) if ctx.quick else (1, max(2, min(6, ctx.repeats // 2)), 2)
    print(f"  {SHAPE_NAME}{' (quick: a tiny model of the same structure)' if ctx.quick else ''}: "
          f"{shape.describe()}, {shape.matmul_params / 1e6:.1f}M matmul parameters; {warm} warm-up + {timed} timed "
          f"steps per run, {rounds} rounds", flush=True)
    model_dir = write_model_dir(root, shape)
    peaks = gemm_peak(ctx)
    for seq in seqs:
        for method in ("lora", "full"):
            for precision in precisions:
                if ctx.cases and not ctx.quick and f"{method}-{precision}" not in ctx.cases:
                    continue
                bench_case(ctx, root, model_dir, shape, Case(method, precision, batch, seq),
                           with_ewc=seq == seqs[0], peaks=peaks, warm=warm, timed=timed, rounds=rounds)
        if seq == seqs[0]:
            bench_packing(ctx, root, model_dir, shape, warm, max(timed, 3), rounds)
