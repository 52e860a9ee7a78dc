"""End to end at a real model's shape: ``python -m bench e2e --shape smollm2-135m``.

A randomly initialised ``LlamaForCausalLM`` with SmolLM2-135M's config (30 layers, width 576,
9 heads / 3 KV heads, MLP 1536, vocabulary 49,152, tied embeddings, rope theta 100,000, 8,192
positions; 134.5M parameters; no download: the weights do not change the speed) and a
49,152-word synthetic tokenizer (``w<id>`` words, one token each, so row lengths are exact).

**Every side runs in its own fresh process, as a user runs it** (``bench/e2e_process.py``):
``rounds`` rounds (2 by default), the order of the sides reversed every other round, each
process 2 warm-up steps then ``--steps`` timed steps (8 by default), its number the median of
steps 3 .. N; every round's number goes in the CSV (``mode=round<i>``), the summary rows
(``mode=full``) hold the mean over rounds (p20 / p80: min / max). Beside tokens/s: each
process's peak RSS (VmHWM) and the peak tensor memory (one extra 2-step process under the
tracker on CPU, model loading included; the allocator's peak on CUDA).

Kernels (providers; ``ours`` is ``python -m trainer.run``'s own ``main``):

* ``sm2_lora``: ``ours`` (method=lora, r=16, alpha=32, every linear of the blocks) against
  ``hf_peft`` (HF Trainer over ``get_peft_model(..., target_modules="all-linear")``),
  ``trl_sft`` (TRL ``SFTTrainer`` + the same ``LoraConfig`` as ``peft_config``, TRL's defaults:
  gradient checkpointing on) and ``trl_sft_fast`` (the same with checkpointing off);
* ``sm2_full``: ``ours`` (method=full) against ``hf_trainer``, ``trl_sft``, ``trl_sft_fast``;
* each at batch 8 x 256 and 8 x 512 (rows of random words longer than ``max_length``, so every
  batch is exactly batch x seq tokens, no padding), in bf16 autocast on every side (ours
  ``bf16=true``, HF and TRL ``bf16=True``: fp32 master weights on all) and in fp32 on every side;
  speed is compared against the fastest peer, peak RSS against the leanest (issue 23's targets);
  ``peak_share``: the share of this machine's GEMM peak in that precision each side's mean
  tokens/s amounts to;
* on CUDA also ``hf_*_liger`` (HF Trainer, ``use_liger_kernel=True``) and ``trl_sft_liger``
  (TRL, checkpointing off, ``use_liger_kernel=True``: TRL 1.16 applies Liger's layer kernels and
  keeps its own chunked LM-head loss in place of Liger's fused linear cross-entropy);
* ``sm2_ewc``: ``ours`` = method=ewc against ``full`` = ours' method=full, from the same rounds as
  ``sm2_full`` at the first sequence length (``sm2_lora_ewc``: lora_ewc against lora likewise);
  the Fisher pass before training is outside the timed steps;
* ``sm2_packing`` (``--case packing``): a mixed-length chat set (prompt/completion rows of ~50
  tokens, 20% replay rows of ~150), batch 8: ``ours`` = ``packing=true`` against ``padded`` =
  ``packing=false``, real (non-padding) tokens/s over the timed steps; both train on the very
  same rows (same seed, same plan), whose real token counts come from the trainer's own plan
  (``trainer.data.plan_batches``);
* ``gemm_peak``: ``torch.matmul`` of 4096x576 by 576x1536 (the MLP's up projection over 8 x
  512 tokens) in fp32 and in bf16, GFLOP/s, measured once per run (in this process).

FLOPs per token, for ``peak_share`` (N = parameters that take part in a matmul: the blocks'
projections plus the LM head, 134.5M for SmolLM2 whose head is the tied embedding; L layers,
H x Q = heads x head dim, T = sequence length, r = LoRA rank):

* full fine-tuning: ``6 N + 12 L H Q T`` (PaLM's model-FLOPs formula, appendix B: forward
  2N, backward 4N; attention's QK^T and AV 4 L H Q T forward, twice that backward);
* LoRA: ``4 N + 6 r S + 12 L H Q T`` with S = sum of (in + out) over the adapted linears: a
  frozen base costs its forward (2N) and the input-gradient half of its backward (2N), no
  weight gradients; each adapter costs forward 2r(in + out), backward 4r(in + out) (input and
  factor gradients). Attention's backward is the same as for full fine-tuning.

A side that fails (a key this checkout lacks, an error) is noted with the end of its output
("ours not ready: ..." for ours) and left out; the others go on. ``--quick`` runs the same code
on a tiny model of the same structure (2 layers, width 64, GQA 2:1, tied head; batch 4 x 32,
fp32 LoRA, ours, hf_peft and trl_sft, one round of 2 + 1 steps, no tracked-memory processes).
On CUDA (``bench/gpu_check.sh``) the default is bf16 at 8 x 512.
"""
from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.e2e_process import RunPlan, add_rows, mean_min_max, measure_sides
from bench.e2e_runners import SideSpec, StepClock, hf_trainer_run
from bench.e2e_runners import run_ours as _run_ours_spec
from bench.harness import BenchContext, Quantiles, Target

SHAPE_NAME = "smollm2-135m"
LORA_R = 16
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GEMM = (4096, 576, 1536)  # M x K @ K x N: 8 x 512 tokens through the MLP's up projection

K_LORA, K_FULL, K_EWC, K_LORA_EWC, K_PACK, K_GEMM = (
    "sm2_lora", "sm2_full", "sm2_ewc", "sm2_lora_ewc", "sm2_packing", "gemm_peak")
CASES = ("lora-bf16", "lora-fp32", "full-bf16", "full-fp32")
PACKING_CASE = "packing"
TRL_SIDES = ("trl_sft", "trl_sft_fast")
PEERS = {"lora": ("hf_peft", *TRL_SIDES), "full": ("hf_trainer", *TRL_SIDES)}


def _issue23_targets() -> list[Target]:
    """Issue 23: LoRA >= 1.6x the fastest peer at <= 0.6x the leanest peer's peak RSS, full
    fine-tuning >= 1.3x at <= 0.8x; 8 x 256 and 8 x 512, bf16 and fp32."""
    out = []
    for method, kernel, speed, rss in (("lora", K_LORA, 1.6, 0.6), ("full", K_FULL, 1.3, 0.8)):
        name = "LoRA" if method == "lora" else "full FT"
        for seq in (512, 256):
            for prec in ("bf16", "fp32"):
                where = f"method={method} prec={prec} batch=8x{seq}"
                out.append(Target(f"issue 23: {name} {prec} tokens/s >= {speed}x the fastest peer, 8x{seq}", kernel,
                                  "throughput", "fastest peer", config_contains=where, min_ratio=speed,
                                  best_of=PEERS[method]))
                out.append(Target(f"issue 23: {name} {prec} peak RSS <= {rss}x the leanest peer, 8x{seq}", kernel,
                                  "rss", "leanest peer", config_contains=where, max_ratio=rss,
                                  best_of=PEERS[method]))
    return out


TARGETS = _issue23_targets() + [
    Target("issue 13: LoRA bf16 peak tensor memory <= 0.6x HF Trainer + PEFT, 8x512", K_LORA, "memory", "hf_peft",
           config_contains="prec=bf16 batch=8x512", max_ratio=0.6),
    Target("issue 13: LoRA fp32 peak tensor memory <= 0.6x HF Trainer + PEFT, 8x512", K_LORA, "memory", "hf_peft",
           config_contains="prec=fp32 batch=8x512", max_ratio=0.6),
    Target("issue 13: full bf16 peak tensor memory <= 0.7x HF Trainer, 8x512", K_FULL, "memory", "hf_trainer",
           config_contains="prec=bf16 batch=8x512", max_ratio=0.7),
    Target("issue 13: ewc step time <= 1.05x full", K_EWC, "time", "full", max_ratio=1.05),
    Target("issue 13: lora_ewc step time <= 1.05x lora", K_LORA_EWC, "time", "lora", max_ratio=1.05),
    Target("issue 13: packing real tokens/s >= 1.5x padded, mixed-length chat set", K_PACK, "throughput",
           "padded", min_ratio=1.5),
]


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
# --quick: the same structure (GQA, tied head), tiny: 2 layers, width 64 (4 heads of 16, 2 KV heads).
QUICK_SHAPE = ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512, max_positions=256)
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


# ----------------------------------------------------------------------------- the sides
@dataclass(frozen=True)
class Case:
    method: str  # lora | full | ewc | lora_ewc
    precision: str  # bf16 | fp32 | auto (our default; the peers are never run at "auto")
    batch: int
    seq: int

    @property
    def config(self) -> str:
        return f"method={self.method} prec={self.precision} batch={self.batch}x{self.seq}"


def _liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def side_specs(case: Case, model_dir: Path, data: Path, out: Path, device: torch.device, with_ewc: bool,
               only: tuple[str, ...] | None = None) -> dict[str, SideSpec]:
    """ours, the HF peer, TRL in its default (gradient checkpointing) and its fast setting, on
    CUDA the Liger variants, and (``with_ewc``) ours' EWC method; ``only`` keeps those names."""
    base = SideSpec(kind="ours", model_dir=str(model_dir), data=str(data), output_dir=str(out / "ours"),
                    method=case.method, precision=case.precision, batch=case.batch, seq=case.seq, steps=1,
                    device=device.type, lora_r=LORA_R)
    hf_name = "hf_peft" if case.method == "lora" else "hf_trainer"
    sides = {
        "ours": base,
        hf_name: replace(base, kind="hf", output_dir=str(out / hf_name)),
        "trl_sft": replace(base, kind="trl", checkpointing=True, output_dir=str(out / "trl_sft")),
        "trl_sft_fast": replace(base, kind="trl", checkpointing=False, output_dir=str(out / "trl_sft_fast")),
    }
    if device.type == "cuda" and _liger_available():
        sides[f"{hf_name}_liger"] = replace(base, kind="hf", liger=True, output_dir=str(out / f"{hf_name}_liger"))
        sides["trl_sft_liger"] = replace(base, kind="trl", liger=True, output_dir=str(out / "trl_sft_liger"))
    if with_ewc:
        ewc = "lora_ewc" if case.method == "lora" else "ewc"
        sides[f"ours_{ewc}"] = replace(base, method=ewc, output_dir=str(out / f"ours_{ewc}"))
    return {name: spec for name, spec in sides.items() if only is None or name in only}


# ----------------------------------------------------------------------------- in-process runners (probes)
class _OnStep(StepClock):
    """A step clock that calls ``on_step()`` (bench/probes' callback style); a StepClock, so the
    runners find every attribute they set (``pending_loss``, ``info``)."""

    def __init__(self, on_step: Callable[[], None] | None) -> None:
        super().__init__("cpu")
        self.on_step = on_step

    def tick(self, loss=None) -> None:
        if self.on_step is not None:
            self.on_step()


def run_ours(model_dir: Path, data: Path, out: Path, case: Case, steps: int, device: torch.device,
             on_step: Callable[[], None] | None = None, extra: dict | None = None) -> None:
    """Ours in *this* process (bench/probes: profiling, ours-against-ours); benchmarks against
    peers use separate processes (bench/e2e_process.py)."""
    spec = SideSpec(kind="ours", model_dir=str(model_dir), data=str(data), output_dir=str(out), method=case.method,
                    precision=case.precision, batch=case.batch, seq=case.seq, steps=steps, device=device.type,
                    lora_r=LORA_R, extra={k: str(v).lower() if isinstance(v, bool) else str(v)
                                          for k, v in (extra or {}).items()})
    _run_ours_spec(spec, _OnStep(on_step))


def run_hf(model_dir: Path, data: Path, out: Path, case: Case, steps: int, device: torch.device,
           on_step: Callable[[], None] | None = None, liger: bool = False) -> None:
    """HF Trainer (+ PEFT LoRA for method=lora) in *this* process (bench/probes only)."""
    spec = SideSpec(kind="hf", model_dir=str(model_dir), data=str(data), output_dir=str(out), method=case.method,
                    precision=case.precision, batch=case.batch, seq=case.seq, steps=steps, device=device.type,
                    lora_r=LORA_R, liger=liger)
    hf_trainer_run(spec, _OnStep(on_step))


def interleave(ctx: BenchContext, label: str, runners: dict[str, Callable], warm: int, timed: int,
               rounds: int) -> dict[str, list[float]]:
    """In-process A B A B step times (ms) of ours-against-ours probes (bench/probes); a runner
    that raises is noted and dropped."""
    step_ms: dict[str, list[float]] = {name: [] for name in runners}
    alive = dict(runners)
    for round_index in range(rounds):
        for name in list(alive) if round_index % 2 == 0 else list(reversed(alive)):
            clock = StepClock(ctx.device.type)
            try:
                alive[name](warm + timed, clock.tick)
            except Exception as exc:  # noqa: BLE001
                ctx.note(f"{label}: {name} failed, left out ({type(exc).__name__}: {str(exc)[:300]})")
                alive.pop(name)
                step_ms.pop(name)
                continue
            gaps = [(b - a) * 1e3 for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]
            step_ms[name] += gaps[warm - 1:]
    return step_ms


# ----------------------------------------------------------------------------- measuring
def gemm_peak(ctx: BenchContext) -> dict[str, float]:
    """GFLOP/s of one ``GEMM``-shaped matmul per precision (median of timed calls)."""
    m, k, n = (128, 64, 128) if ctx.quick else GEMM  # quick: bf16 matmuls crawl on CPUs without bf16 units
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


def bench_case(ctx: BenchContext, root: Path, model_dir: Path, shape: ModelShape, case: Case, with_ewc: bool,
               peaks: dict[str, float], plan: RunPlan, only: tuple[str, ...] | None) -> None:
    kernel = K_LORA if case.method == "lora" else K_FULL
    ewc_method, ewc_kernel = ("lora_ewc", K_LORA_EWC) if case.method == "lora" else ("ewc", K_EWC)
    # Exactly one batch of rows: every step of every side trains on the same rows (the speed does
    # not depend on which rows), so step 1's loss must agree across the sides (first_loss rows).
    data = write_long_rows(root / f"rows-{case.seq}.jsonl", case.batch, case.seq, shape.vocab)
    config = f"{case.config} {shape.describe()} r={LORA_R}"
    print(f"  {kernel} ({config})", flush=True)
    sides = side_specs(case, model_dir, data, root / "out" / f"{case.method}-{case.precision}-{case.seq}",
                       ctx.device, with_ewc, only)
    ewc_name = f"ours_{ewc_method}"
    tokens = case.batch * case.seq
    measured = measure_sides(ctx, kernel, config, tokens, sides, plan, row_sides=[n for n in sides if n != ewc_name])
    live = {n: s for n, s in measured.items() if s.error is None and s.results}
    flops = shape.flops_per_token(case.method, case.seq)
    peak = peaks[case.precision if case.precision in peaks else "fp32"]
    shares = []
    for name, side in live.items():
        if name == ewc_name:
            continue
        mean = statistics.fmean(side.tokens_per_s(tokens, plan.warmup_steps))
        share = mean * flops / (peak * 1e9)
        ctx.add(kernel, name, "full", "peak_share", "tokens", tokens, Quantiles.single(share), config)
        shares.append(f"{name} {share:.1%}")
    print(f"    share of the {case.precision} GEMM peak ({flops / 1e6:,.3g} MFLOP/token): {', '.join(shares)}",
          flush=True)
    if ewc_name in live and "ours" in live:
        ewc_config = f"{Case(ewc_method, case.precision, case.batch, case.seq).config} {shape.describe()}"
        add_rows(ctx, ewc_kernel, ewc_config, tokens, {"ours": live[ewc_name], case.method: live["ours"]},
                 plan.warmup_steps)


def bench_packing(ctx: BenchContext, root: Path, model_dir: Path, shape: ModelShape, plan: RunPlan,
                  only: tuple[str, ...] | None) -> None:
    """Packed against padded batches on a mixed-length chat set, same rows, real tokens/s."""
    from transformers import AutoTokenizer

    from trainer.data import plan_batches, tokenize_file

    batch, replay_ratio, max_length = (4, 0.25, 64) if ctx.quick else (8, 0.2, 256)
    short, long = (((4, 1), (6, 2)), ((10, 2), (20, 4))) if ctx.quick else (((20, 5), (30, 8)), ((50, 10), (100, 20)))
    steps = plan.steps
    task = write_chat_rows(root / "chat-task.jsonl", 4 * batch * steps, *short, shape.vocab, seed=11)
    replay = write_chat_rows(root / "chat-long.jsonl", batch * steps, *long, shape.vocab, seed=12)
    case = Case("lora", "auto", batch, max_length)
    config = (f"method=lora prec=auto batch={batch} mixed: task ~{short[0][0] + short[1][0]} tokens, "
              f"{replay_ratio:.0%} replay ~{long[0][0] + long[1][0]} {shape.describe()}")
    print(f"  {K_PACK} ({config})", flush=True)
    base = SideSpec(kind="ours", model_dir=str(model_dir), data=str(task), output_dir=str(root / "out" / "packing"),
                    method=case.method, precision=case.precision, batch=case.batch, seq=case.seq, steps=1,
                    device=ctx.device.type, lora_r=LORA_R)
    extra = {"replay_data": str(replay), "replay_ratio": str(replay_ratio)}
    sides = {"ours": replace(base, extra={**extra, "packing": "true"}, output_dir=f"{base.output_dir}-packed"),
             "padded": replace(base, extra={**extra, "packing": "false"}, output_dir=f"{base.output_dir}-padded")}
    sides = {n: s for n, s in sides.items() if only is None or n in only}
    # Real tokens of each step, from the plan both runs follow (validation_split=0, seed 0).
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    sources = {0: tokenize_file(task, tokenizer, max_length).examples,
               1: tokenize_file(replay, tokenizer, max_length).examples}
    batches = plan_batches(len(sources[0]), len(sources[1]), replay_ratio, batch, steps, seed=0)
    real = [sum(len(sources[s][i].input_ids) for s, i in rows) for rows in batches]
    padded = [batch * max(len(sources[s][i].input_ids) for s, i in rows) for rows in batches]
    timed_real = real[plan.warmup_steps:]  # the timed steps are warmup + 1 .. N (1-based)
    measured = measure_sides(ctx, K_PACK, config, round(statistics.fmean(timed_real)), sides, plan, row_sides=())
    for name, side in measured.items():
        if side.error is not None or not side.results:
            continue
        rates, times = [], []
        for i, result in enumerate(side.results, start=1):
            ms = result.step_ms(plan.warmup_steps)
            per_step = [r / m * 1e3 for r, m in zip(timed_real, ms, strict=False)]
            rates.append(sum(timed_real[:len(ms)]) / sum(ms) * 1e3)
            times.append(statistics.median(ms))
            ctx.add(K_PACK, name, f"round{i}", "throughput", "rows", f"{batch} mixed", Quantiles.of(per_step), config)
            ctx.add(K_PACK, name, f"round{i}", "time", "rows", f"{batch} mixed", Quantiles.of(ms), config)
        ctx.add(K_PACK, name, "full", "throughput", "rows", f"{batch} mixed", mean_min_max(rates), config)
        ctx.add(K_PACK, name, "full", "time", "rows", f"{batch} mixed", mean_min_max(times), config)
    share = 1 - sum(real[1:]) / sum(padded[1:])
    print(f"    real tokens per step {sum(real) / len(real):,.0f}; padded batches would hold "
          f"{sum(padded) / len(padded):,.0f} ({share:.0%} padding)", flush=True)


def run_plan(ctx: BenchContext) -> RunPlan:
    """Rounds and steps: ``--rounds`` / ``--steps``, else 2 rounds of 2 + 8 steps (quick: 1 of 2 + 1)."""
    return RunPlan(rounds=ctx.rounds or (1 if ctx.quick else 2), timed_steps=ctx.timed_steps or (1 if ctx.quick else 8),
                   warmup_steps=2, tensor_memory=ctx.tensor_memory and not ctx.quick)


def run(ctx: BenchContext, root: Path) -> None:
    shape = QUICK_SHAPE if ctx.quick else SMOLLM2_135M
    batch, seqs = (4, (32,)) if ctx.quick else (8, (512, 256))  # the 8 x 512 cases first
    cuda = ctx.device.type == "cuda" and not ctx.quick
    if ctx.seqs and not ctx.quick:
        seqs = tuple(ctx.seqs)
    elif cuda:
        seqs = (512,)  # bench/gpu_check.sh: the GPU's time is short
    cases = ctx.cases or (("lora-fp32",) if ctx.quick else ("lora-bf16", "full-bf16") if cuda
                          else (*CASES, PACKING_CASE))
    only = ctx.only or (("ours", "hf_peft", "trl_sft") if ctx.quick else None)
    plan = run_plan(ctx)
    print(f"  {SHAPE_NAME}{' (quick: a tiny model of the same structure)' if ctx.quick else ''}: "
          f"{shape.describe()}, {shape.matmul_params / 1e6:.1f}M matmul parameters; one process per side and "
          f"round: {plan.rounds} round(s) of {plan.warmup_steps} warm-up + {plan.timed_steps} timed steps",
          flush=True)
    model_dir = write_model_dir(root, shape)
    peaks = gemm_peak(ctx)
    for seq in seqs:
        for name in CASES:
            if name in cases:
                method, precision = name.split("-")
                bench_case(ctx, root, model_dir, shape, Case(method, precision, batch, seq),
                           with_ewc=seq == seqs[0] and not ctx.quick, peaks=peaks, plan=plan, only=only)
        if seq == seqs[0] and PACKING_CASE in cases:
            bench_packing(ctx, root, model_dir, shape, plan, only)
