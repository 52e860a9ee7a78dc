"""The trainer's side of chat eval: the shipped general chat suite becomes the default
capability_suite for a chat model trained on chat rows, capability_max_format_rigidity is
checked before training and reaches the report, and the suite ships with the package."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from tiny_models import tiny_llama, tiny_tokenizer

from eval.suite import load_suite, shipped_suite
from trainer.config import ConfigError, parse_command_line, validate
from trainer.run import CHAT_RECIPE, check_capability_gates, default_chat_recipe, default_chat_suite

REPO = Path(__file__).resolve().parents[1]
# No new special tokens: the template is plain text, so the tiny model's vocabulary covers it.
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant: {% endif %}")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_trainer")
    chat_model, plain_model = root / "chat_model", root / "plain_model"
    for folder, template in ((chat_model, PLAIN_CHAT_TEMPLATE), (plain_model, None)):
        tiny_llama(seed=1, hidden_size=32, intermediate_size=40, num_attention_heads=2,
                   num_key_value_heads=1).save_pretrained(folder)
        tok = tiny_tokenizer()
        tok.chat_template = template
        tok.save_pretrained(folder)
    chats = [{"messages": [{"role": "user", "content": f"ticket {i}"}, {"role": "assistant", "content": f"T-{i}"}]}
             for i in range(8)]
    return {"chat_model": chat_model, "plain_model": plain_model,
            "chats": _jsonl(root / "chats.jsonl", chats),
            "pairs": _jsonl(root / "pairs.jsonl", [{"prompt": "a", "completion": "b"}] * 4),
            "task": _jsonl(root / "task_suite.jsonl", [{"_meta": {"chat": True, "task_format": "^"}},
                                                       {"category": "task", "prompt": "ticket 1",
                                                        "answer": "T-1", "max_new_tokens": 4}])}


def _cfg(*args: str):
    cfg, explicit = parse_command_line(list(args))
    return cfg, explicit


def test_the_general_chat_suite_ships_with_the_package_and_loads():
    path = shipped_suite("chat_general")
    assert path == REPO / "eval" / "suites" / "chat_general.jsonl"
    suite = load_suite(path)
    assert suite.meta.chat is True and len(suite.rows) >= 150
    counts = Counter(r.category for r in suite.rows)
    assert set(counts) == {"knowledge", "arithmetic", "language", "instructions", "safety", "chat"}
    assert all(r.kind == "refusal" for r in suite.rows if r.category == "safety")
    assert all(r.match in ("contains", "regex", "any_of") for r in suite.rows if r.kind == "exact")
    assert all(r.max_new_tokens and 16 <= r.max_new_tokens <= 48 for r in suite.rows)
    setup = (REPO / "setup.py").read_text()
    assert '"suites/*.jsonl"' in setup  # package_data: installed beside eval/, not only in a checkout


def test_default_suite_for_a_chat_model_on_chat_rows(chat_ws, capsys):
    cfg = default_chat_suite(*_cfg(f"model={chat_ws['chat_model']}", f"data={chat_ws['chats']}"))
    assert cfg.capability_suite == str(shipped_suite("chat_general"))
    assert "capability_suite: not given" in capsys.readouterr().out
    for args in ([f"model={chat_ws['plain_model']}", f"data={chat_ws['chats']}"],   # no chat template
                 [f"model={chat_ws['chat_model']}", f"data={chat_ws['pairs']}"],    # not chat rows
                 [f"model={chat_ws['chat_model']}", f"data={chat_ws['chats']}", "capability_suite=none"],
                 [f"model={chat_ws['chat_model']}", f"data={chat_ws['chats']}", f"capability_suite={chat_ws['task']}"]):
        cfg, explicit = _cfg(*args)
        assert default_chat_suite(cfg, explicit).capability_suite == cfg.capability_suite, args
    assert "capability_suite: not given" not in capsys.readouterr().out


def test_default_recipe_for_a_chat_model_on_chat_rows(chat_ws, capsys):
    """No replay and no KL given: self-replay at 10%, marked as the chat default; any of them
    given (even replay_ratio=0), another method, no template or no chat rows: untouched."""
    def recipe(*args):
        cfg, explicit = _cfg(*args)
        return default_chat_recipe(cfg, {k: "you" for k in explicit})

    cfg, sources = recipe(f"model={chat_ws['chat_model']}", f"data={chat_ws['chats']}", "max_steps=80")
    assert (cfg.replay_data, cfg.replay_ratio) == ("self", 0.1) == (CHAT_RECIPE["replay_data"], CHAT_RECIPE["replay_ratio"])
    assert sources["replay_data"] == sources["replay_ratio"] == "chat default"
    assert "replay: not given" in capsys.readouterr().out
    # The share shows the run 64 replay rows in all, between 10% and 40%: by max_steps (batch 8:
    # 64 / (steps x 8)), or by epochs over the file's 8 rows (2 epochs at 40%: 4.8 task rows a step,
    # ceil(16 / 4.8) = 4 steps, capped; 100 epochs at 10%: ceil(800 / 7.2) = 112 steps, floored).
    for args, ratio in ((["max_steps=79"], 64 / 632), (["max_steps=40"], 0.2), (["max_steps=20"], 0.4),
                        (["max_steps=10"], 0.4), (["num_train_epochs=2"], 0.4), (["num_train_epochs=100"], 0.1)):
        cfg, sources = recipe(f"model={chat_ws['chat_model']}", f"data={chat_ws['chats']}",
                              "per_device_train_batch_size=8", *args)
        assert (cfg.replay_data, sources["replay_ratio"]) == ("self", "chat default"), args
        assert cfg.replay_ratio == pytest.approx(ratio, abs=1e-4), args
    out = capsys.readouterr().out
    assert "as 20.0% of every batch (a run of 40 optimizer steps of 8 rows: 64 replay rows in all; replay_data" in out
    assert "as 40.0% of every batch (a run of 20 optimizer steps of 8 rows: 64 replay rows in all; runs under 40" in out
    assert "a run of 10 optimizer steps of 8 rows: 32 replay rows in all; runs under 40 steps failed" in out
    assert "a run of 4 optimizer steps of 8 rows: 13 replay rows in all; runs under 40" in out
    assert "as 10.0% of every batch (a run of 112 optimizer steps of 8 rows: 90 replay rows in all; replay_data" in out
    for args in ([f"model={chat_ws['plain_model']}", f"data={chat_ws['chats']}"],     # no chat template
                 [f"model={chat_ws['chat_model']}", f"data={chat_ws['pairs']}"],      # not chat rows
                 [f"model={chat_ws['chat_model']}", f"data={chat_ws['chats']}", "replay_ratio=0"],
                 [f"model={chat_ws['chat_model']}", f"data={chat_ws['chats']}", "kl_to_base=0.5"],
                 [f"model={chat_ws['chat_model']}", f"data={chat_ws['chats']}", "method=lora_ewc"]):
        cfg, sources = recipe(*args)
        assert (cfg.replay_data, cfg.replay_ratio) == (None, 0.0), args
        assert "chat default" not in sources.values(), args
    assert "replay: not given" not in capsys.readouterr().out


def test_format_rigidity_bound_is_checked_before_training(chat_ws, tmp_path):
    with pytest.raises(ConfigError, match=r"capability_max_format_rigidity=-1.0: must be >= 0 points"):
        validate(_cfg(f"data={chat_ws['chats']}", "capability_max_format_rigidity=-1")[0])
    cfg, _ = _cfg(f"data={chat_ws['chats']}", "capability_max_format_rigidity=5")
    with pytest.raises(ConfigError, match="needs capability_suite"):
        check_capability_gates(cfg)
    cfg, _ = _cfg(f"capability_suite={shipped_suite('chat_general')}", "capability_max_format_rigidity=5")
    with pytest.raises(ConfigError, match=r"needs the task's answer format: set _meta.task_format"):
        check_capability_gates(cfg)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"category": "c", "prompt": "p", "match": "regex", "answer": "("}])
    cfg, _ = _cfg(f"capability_suite={bad}", "capability_max_format_rigidity=5")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: .*not a valid regex"):
        check_capability_gates(cfg)
    cfg, _ = _cfg(f"capability_suite={shipped_suite('chat_general')}", f"capability_task={chat_ws['task']}",
                  "capability_max_format_rigidity=5")
    check_capability_gates(cfg)  # the task suite names the format: fine


def test_a_chat_run_scores_the_default_suite_and_gates_format_rigidity(chat_ws, tmp_path):
    """End to end, in a subprocess: the default suite is announced and scored, and the bound
    reaches the report.  The task format "^" matches every answer, so both models' rigidity is
    100 and the rise is exactly 0: a bound of 0 passes (not *more* than the bound)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               FORGETLESS_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.run", f"model={chat_ws['chat_model']}", f"data={chat_ws['chats']}",
         f"output_dir={out}", "max_steps=2", "per_device_train_batch_size=2", "lora_r=2", "progress=false",
         "validation_split=0", "device=cpu", f"capability_task={chat_ws['task']}", "capability_limit=6",
         "replay_ratio=0",  # no chat-default self-replay: this test is about the suite and the gate
         "capability_max_format_rigidity=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "capability_suite: not given" in proc.stdout and "chat_general.jsonl" in proc.stdout
    assert "PASS: format rigidity rose +0.0 points" in proc.stdout
    report = json.loads((out / "forgetting_report.json").read_text())
    assert report["suite"]["name"] == "chat_general" and report["suite"]["rows"] == 6
    assert report["format_rigidity"] == {"task_format": "^", "n": 6, "in_format": 6, "rate": 100.0}
    f = report["forgetting"]
    assert (f["max_format_rigidity"], f["format_rigidity_rise"], f["format_rigidity_failed"]) == (0.0, 0.0, False)
    assert all(row["chat"] for row in report["rows"])  # the suite's _meta.chat rendered every prompt


def test_a_sequence_of_chat_stages_gets_the_chat_default_per_stage(chat_ws, tmp_path, capsys):
    """trainer.sequence applies trainer.run's chat default to every stage when nothing is said
    about replay; replay_ratio=0, a replay buffer or a model without a chat template: untouched."""
    from trainer import sequence

    config = tmp_path / "seq.yaml"
    config.write_text(f"model: {chat_ws['chat_model']}\nmethod: lora\nmax_steps: 80\nstages:\n"
                      + "".join(f"  - {{name: s{i}, data: {chat_ws['chats']}, capability_task: {chat_ws['task']}}}\n"
                                for i in (1, 2)))

    def stages(*args, model=chat_ws["chat_model"]):
        spec = sequence.parse_spec(["--config", str(config), f"output_dir={tmp_path / 'out'}", *args])
        return sequence.with_chat_default(spec, sequence.stage_configs(spec), str(model))

    defaulted = stages()
    assert [(s.cfg.replay_data, s.cfg.replay_ratio, s.replay_ratio) for s in defaulted] == \
        [(CHAT_RECIPE["replay_data"], CHAT_RECIPE["replay_ratio"], CHAT_RECIPE["replay_ratio"])] * 2
    assert capsys.readouterr().out.count("replay: not given") == 2
    for args, model in ((["replay_ratio=0"], chat_ws["chat_model"]),
                        (["replay_buffer=4", "replay_ratio=0.2"], chat_ws["chat_model"]),
                        ([], chat_ws["plain_model"])):
        assert all(s.cfg.replay_data is None for s in stages(*args, model=model)), (args, model)
    assert "replay: not given" not in capsys.readouterr().out


def test_a_sequence_replays_its_buffer_and_its_own_answers_in_one_file(chat_ws, tmp_path, monkeypatch):
    """replay_buffer beside replay_data=self: stage 2's replay file holds the earlier stage's chats
    and the start model's own answers to the prompt bank, at replay_buffer_share; rows of another
    format than chats cannot share that file."""
    from dataclasses import replace

    import torch

    from trainer import sequence
    from trainer.data import read_jsonl
    from trainer.loop import load_model
    from trainer.self_replay import self_replay_from_config

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "seq.yaml"
    shared = (f"model: {chat_ws['chat_model']}\nmethod: lora\nmax_steps: 2\nlora_between: merge\nreplay_buffer: 4\n"
              "replay_ratio: 0.25\nreplay_data: self\nself_replay_samples: 3\nself_replay_max_new_tokens: 4\n")
    config.write_text(shared + "stages:\n" + "".join(
        f"  - {{name: s{i}, data: {chat_ws['chats']}, capability_task: {chat_ws['task']}}}\n" for i in (1, 2)))
    spec = sequence.parse_spec(["--config", str(config), f"output_dir={tmp_path / 'out'}"])
    stages = sequence.stage_configs(spec)
    assert stages[0].cfg.replay_data == "self"  # stage 1 has no buffer yet: its own answers only
    done = [{"saved_to": str(tmp_path / "unused"), "merged": str(chat_ws["chat_model"])}]
    cfg, wired = sequence.wire_stage(spec, stages, 1, done, str(chat_ws["chat_model"]), tmp_path / "out")
    rows = read_jsonl(cfg.replay_data)
    # The reference: the start model's self-replay file, built on its own (the cache gives it back).
    model, tokenizer = load_model(replace(stages[1].cfg, model=str(chat_ws["chat_model"])), torch.device("cpu"))
    own_path, _ = self_replay_from_config(stages[1].cfg, model, tokenizer)
    own = read_jsonl(own_path)
    chats = read_jsonl(chat_ws["chats"])
    buffer = [r for r in rows if r in chats]
    assert len(buffer) == 4 and wired["replay_buffer"]["buffer_rows"] == 4
    assert len(own) == 3 and sorted(map(str, rows[4:])) == sorted(map(str, own))  # share 0.5: 4 buffer -> 4 wanted, 3 exist
    assert cfg.replay_ratio == 0.25
    # prompt/completion stages cannot take chat-shaped self-replay rows into the same file
    config.write_text(shared + "stages:\n" + "".join(
        f"  - {{name: s{i}, data: {chat_ws['pairs']}, capability_task: {chat_ws['task']}}}\n" for i in (1, 2)))
    spec = sequence.parse_spec(["--config", str(config), f"output_dir={tmp_path / 'out2'}"])
    with pytest.raises(sequence.SequenceError, match=r"one row format.*replay_data=self \(messages\)"):
        sequence.stage_configs(spec)
