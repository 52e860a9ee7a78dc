"""forgetless ``objective=sdft`` against TRL 1.16's ``SDFTTrainer``: optimizer steps per second and
peak RSS at the same settings, each side in its own fresh process, alternating order over rounds.

``python -m bench.sdft_vs_trl [--rounds 2] [--steps 8] [--batch-size 4] [--max-new-tokens 24] [--bf16] [--out DIR]``

Both sides: SmolLM2-135M-Instruct (the project's converted directory), LoRA r16 alpha 32 on every
linear layer, the flights chat rows, one rollout per prompt of at most ``--max-new-tokens``
sampled tokens at temperature 1, the teacher the base with the demonstration in its context (the
paper's template), forward KL over the full vocabulary, the first 3 sampled tokens skipped, fp32
(``bf16=false``: the matched precision; TRL runs fp32 on CPU unless told otherwise) or, with
``--bf16``, bf16 autocast on both sides (ours ``bf16=true``, TRL ``bf16=True``: worth measuring
only on a CPU with native bf16, e.g. AVX512_BF16), one thread
count for both (whatever the environment gives), no validation on either side (TRL's row runs
none; ours with ``eval_data`` would add a 200-row validation and KL-proxy pass to the process's
wall time and memory, not to its steps). A step's time is the median of the steps after
the second (both warm up); peak RSS is each process's VmHWM.

Prints one line per process and a summary: the ratio of mean steps/s (ours / TRL) with the
min-max of the per-round ratios, the ratio of mean peak RSS, and each side's rollout seconds a
step (ours from metrics.jsonl, TRL's the time inside ``generate``). Writes ``rounds.json`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def ours_command(args, out: Path) -> list[str]:
    return [sys.executable, "-m", "trainer.run", "model=smollm2-135m-instruct", "data=chat-task:flights",
            "method=lora", "lora_r=16", "lora_alpha=32", "objective=sdft",
            "sdft_teacher=base", "sdft_divergence=forward", f"sdft_max_new_tokens={args.max_new_tokens}",
            "sdft_num_generations=1", "sdft_temperature=1.0", "sdft_skip_tokens=3", "replay_ratio=0",
            f"per_device_train_batch_size={args.batch_size}", f"max_steps={args.steps}", "warmup_steps=5",
            "learning_rate=1e-3", f"bf16={'true' if args.bf16 else 'false'}",
            "capability_suite=none", "capability_task=none",
            "validation_split=0", "progress=false", f"output_dir={out}"]


def ours_result(out: Path, log: str) -> dict:
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_seconds"] for r in steps if "step_seconds" in r]
    rollout = [r["rollout_seconds"] for r in steps if "rollout_seconds" in r]
    peak = next(float(part.split()[0].replace(",", "")) for line in log.splitlines() if "peak memory" in line
                for part in [line.split("peak memory", 1)[1]])
    timed, timed_rollout = times[2:] or times, rollout[2:] or rollout
    return {"median_step_s": statistics.median(timed), "median_rollout_s": statistics.median(timed_rollout),
            "peak_rss_mb": peak, "steps": len(times)}


def trl_command(args, out: Path) -> list[str]:
    return [sys.executable, "-m", "bench.trl_sdft_row", "--task", "flights", "--out", str(out),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--max-new-tokens", str(args.max_new_tokens), "--no-score", *(["--bf16"] if args.bf16 else [])]


def trl_result(out: Path, log: str) -> dict:
    row = json.loads((out / "trl_row.json").read_text())
    return {"median_step_s": row["median_step_s"], "median_rollout_s": row.get("median_rollout_s"),
            "peak_rss_mb": row["peak_rss_mb"], "steps": row["steps"]}


SIDES = {"forgetless": (ours_command, ours_result), "trl": (trl_command, trl_result)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (default: fp32 on both)")
    ap.add_argument("--out", default="runs/sdft_vs_trl")
    args = ap.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    rounds: list[dict] = []
    for r in range(args.rounds):
        order = list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]
        for side in order:
            command, read = SIDES[side]
            out = root / f"round{r}-{side}"
            t0 = time.perf_counter()
            proc = subprocess.run(command(args, out), capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{side} failed in round {r} (exit {proc.returncode})")
            result = {"round": r, "side": side, "wall_s": round(time.perf_counter() - t0, 1),
                      **read(out, proc.stdout + proc.stderr)}
            rounds.append(result)
            print(json.dumps(result), flush=True)
    (root / "rounds.json").write_text(json.dumps(rounds, indent=2) + "\n")

    def mean(side: str, key: str) -> float:
        return statistics.mean(x[key] for x in rounds if x["side"] == side)

    per_round = [next(x for x in rounds if x["round"] == r and x["side"] == "trl")["median_step_s"]
                 / next(x for x in rounds if x["round"] == r and x["side"] == "forgetless")["median_step_s"]
                 for r in range(args.rounds)]
    speed = mean("trl", "median_step_s") / mean("forgetless", "median_step_s")
    memory = mean("forgetless", "peak_rss_mb") / mean("trl", "peak_rss_mb")
    print(f"steps/s ours / TRL: {speed:.2f}x (rounds {min(per_round):.2f}-{max(per_round):.2f}); "
          f"s/step ours {mean('forgetless', 'median_step_s'):.2f} vs TRL {mean('trl', 'median_step_s'):.2f}; "
          f"peak RSS ours / TRL: {memory:.2f}x ({mean('forgetless', 'peak_rss_mb'):,.0f} vs "
          f"{mean('trl', 'peak_rss_mb'):,.0f} MB); of a step the rollout: ours "
          f"{mean('forgetless', 'median_rollout_s'):.2f} s vs TRL {mean('trl', 'median_rollout_s'):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
