"""Self-replay's generation and the chat suite's scoring, at an older commit and at this checkout.

``python -m bench.probes.generation_speed --old COMMIT [--rounds 2] [--workload self-replay|suite]``

Issue 23's last sampler target: "self-replay's 256-prompt generation and the chat suite's scoring
each >= 2x faster than today, same outputs", today being the commit before the sampler work
(123c8a5, the parent of ea83645). Each (round, workload, side) runs in a fresh process, as a user
runs them, sides in reversed order every other round:

- ``old``: the workload at ``--old`` (a temporary ``git worktree`` of it), fp32 weights;
- ``new``: the same at this checkout, fp32 weights (what ``trainer.run`` and ``python -m eval`` do
  by default: both decode the model in its own dtype);
- ``new-bf16``: this checkout with the weights loaded in bf16 (``--dtype bfloat16`` for eval), the
  lean decoder's packed bf16 path on a CPU with native bf16. Its outputs are bf16's, not fp32's:
  the probe counts how many differ from ``old``'s.

Workloads (SmolLM2-135M-Instruct from the cache, the machine's default threads):
- ``self-replay``: ``trainer.self_replay.build_self_replay`` on the 256 bank prompts seed 0 draws,
  greedy, at most 128 new tokens, batch 32 (TrainConfig's ``per_device_eval_batch_size``), into a
  temporary cache; time = the generation's own seconds (its stats).
- ``suite``: ``python -m eval --model DIR --suite eval/suites/chat_general.jsonl --no-cache --quiet``
  (the shipped suite a chat run scores by default); time = the report's scoring seconds.

Both APIs are the same at 123c8a5 and now, which is why the child code below can run at either.
Prints a table (median seconds per side, ratio old / side, outputs that differ from old's) and
writes every process's numbers to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = ("self-replay", "suite")
SIDES = ("old", "new", "new-bf16")

SELF_REPLAY_CHILD = r"""
import json, sys, tempfile, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trainer.self_replay import SelfReplaySettings, build_self_replay, prompt_bank, select_prompts
model_dir, dtype = sys.argv[1], getattr(torch, sys.argv[2])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
prompts = select_prompts(prompt_bank(None), int(sys.argv[3]), 0)
with tempfile.TemporaryDirectory() as cache:
    path, stats = build_self_replay(model, tok, prompts, SelfReplaySettings(batch_size=32), cache_dir=cache,
                                    log=lambda line: None)
    chats = [json.loads(line)["messages"] for line in open(path)]
    answers = {chat[0]["content"]: chat[1]["content"] for chat in chats}
print("RESULT " + json.dumps({"seconds": stats.seconds, "outputs": [answers.get(p) for p in prompts]}))
"""


def _env(checkout: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(checkout)}


def _child_self_replay(checkout: Path, model_dir: str, dtype: str, limit: int | None) -> dict:
    out = subprocess.run([sys.executable, "-c", SELF_REPLAY_CHILD, model_dir, dtype, str(limit or 256)],
                         cwd=checkout, env=_env(checkout), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"self-replay child at {checkout} failed:\n{out.stderr[-3000:]}")
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _child_suite(checkout: Path, model_dir: str, dtype: str, limit: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        suite = REPO / "eval/suites/chat_general.jsonl"
        cmd = [sys.executable, "-m", "eval", "--model", model_dir, "--suite", str(suite), "--no-cache",
               "--quiet", "--dtype", dtype, "--out", str(report)] + (["--limit", str(limit)] if limit else [])
        out = subprocess.run(cmd, cwd=checkout, env=_env(checkout), capture_output=True, text=True)
        if out.returncode not in (0, 1):  # 1 = a gate failed; no gate is asked for here
            raise SystemExit(f"eval at {checkout} failed:\n{out.stderr[-3000:]}")
        data = json.loads(report.read_text())
    return {"seconds": data["timing"]["seconds"], "outputs": [r["output"] for r in data["rows"]]}


def run_side(workload: str, side: str, old_checkout: Path, model_dir: str, limit: int | None) -> dict:
    checkout = old_checkout if side == "old" else REPO
    dtype = "bfloat16" if side == "new-bf16" else "float32"
    child = _child_self_replay if workload == "self-replay" else _child_suite
    return child(checkout, model_dir, dtype, limit)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="the commit to compare against (e.g. 123c8a5)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workload", action="append", choices=WORKLOADS, help="default: both")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {','.join(SIDES)}")
    ap.add_argument("--limit", type=int,
                    help="a quick check: this many self-replay prompts and suite rows")
    ap.add_argument("--out", default="generation_speed.json")
    args = ap.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    unknown = set(sides) - set(SIDES)
    if unknown or "old" not in sides:
        ap.error(f"--sides: {sorted(unknown) or 'old is needed'} (of {','.join(SIDES)}; old is the "
                 "reference)")
    from eval.model_source import resolve_model

    model_dir = str(resolve_model("smollm2-135m-instruct"))
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        old_checkout = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_checkout), args.old],
                       check=True, capture_output=True)
        try:
            for r in range(args.rounds):
                for workload in args.workload or WORKLOADS:
                    for side in (sides if r % 2 == 0 else sides[::-1]):
                        started = time.perf_counter()
                        res = run_side(workload, side, old_checkout, model_dir, args.limit)
                        res.update(round=r, workload=workload, side=side, wall=time.perf_counter() - started)
                        print(f"round {r} {workload:11s} {side:8s} {res['seconds']:8.1f} s "
                              f"(process {res['wall']:.0f} s)", flush=True)
                        results.append(res)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_checkout)],
                           capture_output=True)
    record = {"old": args.old, "loadavg_after": os.getloadavg(), "results": results}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print("\n| workload | side | seconds (rounds) | median | old / side | outputs differing from old's |")
    print("|---|---|---|---:|---:|---:|")
    for workload in args.workload or WORKLOADS:
        rows = {s: [x for x in results if x["workload"] == workload and x["side"] == s] for s in sides}
        old_median = statistics.median(x["seconds"] for x in rows["old"])
        reference = rows["old"][0]["outputs"]
        for side in sides:
            secs = [x["seconds"] for x in rows[side]]
            differ = sum(a != b for a, b in zip(reference, rows[side][0]["outputs"], strict=True))
            median = statistics.median(secs)
            print(f"| {workload} | {side} | {' / '.join(f'{s:.1f}' for s in secs)} | {median:.1f} | "
                  f"{old_median / median:.2f}x | {differ} of {len(reference)} |")
    print(f"(numbers: {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
