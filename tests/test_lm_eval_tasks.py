"""lm-evaluation-harness tasks by name (eval/lm_eval_tasks.py), offline, on a tiny random Llama.

The reference is lm-eval itself: ``simple_evaluate`` on the same task with its own
TaskManager (only the test's folder) and an HFLM around the same model.  The tasks are
written here: a YAML per task reading local JSON files, so nothing is downloaded.
"""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_llama, tiny_tokenizer  # noqa: E402

import eval as ev  # noqa: E402
from eval import __main__ as cli  # noqa: E402
from eval.lm_eval_tasks import (  # noqa: E402
    LmEvalSpec,
    LmEvalTaskError,
    check_lm_eval_spec,
    parse_lm_eval_spec,
    score_lm_eval_tasks,
)

MC_TASK, GEN_TASK, NO_DATA_TASK, HUB_TASK = "fl_mc", "fl_gen", "fl_nodata", "fl_hub"
N_ROWS = 7


def _write_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    rows = [{"question": f"What is {i} plus {i + 1}?", "choices": [str(2 * i + 1), str(2 * i), "seven"],
             "label": i % 3, "answer": str(2 * i + 1)} for i in range(N_ROWS)]
    data = tasks / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "mc.yaml").write_text(f"""task: {MC_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (tasks / "gen.yaml").write_text(f"""task: {GEN_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    (tasks / "nodata.yaml").write_text(f"""task: {NO_DATA_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "gone.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
""")
    (tasks / "hub.yaml").write_text(f"""task: {HUB_TASK}
dataset_path: forgetless-test/never-cached
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
""")
    return tasks


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    old_cache = os.environ.get("FORGETLESS_CACHE")
    os.environ["FORGETLESS_CACHE"] = str(root / "cache")
    torch.set_num_threads(1)
    model_dir = root / "model"
    tiny_llama(seed=7).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    model, tokenizer = cli.load_model(str(model_dir), None, "cpu", "float32")
    yield SimpleNamespace(root=root, tasks=_write_tasks(root), model_dir=model_dir, model=model, tokenizer=tokenizer)
    if old_cache is None:
        os.environ.pop("FORGETLESS_CACHE", None)
    else:
        os.environ["FORGETLESS_CACHE"] = old_cache


def _lm_eval_reference(model, tokenizer, tasks_dir: Path, task: str) -> dict:
    """lm-eval's own run: its TaskManager over the test's folder only, HFLM around the model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=[task],
                                   task_manager=manager, log_samples=True)


def _assert_rows_match_samples(report, reference, task, metric):
    samples = [s for s in reference["samples"][task] if s["filter"] == "none"]
    rows = {r.line: r for r in report.rows if r.category == task}
    assert sorted(rows) == sorted(s["doc_id"] + 1 for s in samples) == list(range(1, N_ROWS + 1))
    for sample in samples:
        row = rows[sample["doc_id"] + 1]
        assert row.correct == bool(sample[metric])
        assert row.prompt == sample["arguments"][0][0]
        if metric == "acc":
            assert row.logliks == pytest.approx([r[0] for r in sample["filtered_resps"]], abs=1e-5)


def test_spec_syntax():
    assert parse_lm_eval_spec("lm-eval:arc_easy, gsm8k") == LmEvalSpec(("arc_easy", "gsm8k"))
    assert parse_lm_eval_spec("lm-eval:/my/ta:sks:mine") == LmEvalSpec(("mine",), "/my/ta:sks")
    assert parse_lm_eval_spec("lm-eval:/my/tasks:a,b").name == "lm-eval:/my/tasks:a,b"
    with pytest.raises(LmEvalTaskError, match="no task names"):
        parse_lm_eval_spec("lm-eval:")


def test_scores_and_rows_equal_lm_eval_simple_evaluate(world):
    """Both output types; through score_model's dispatch of an ``lm-eval:`` spec (the trainer's path)."""
    spec = f"lm-eval:{world.tasks}:{MC_TASK},{GEN_TASK}"
    report = ev.score_model(world.model, world.tokenizer, spec, batch_size=4)
    assert sorted(report.categories) == [GEN_TASK, MC_TASK]
    for task, metric in ((MC_TASK, "acc"), (GEN_TASK, "exact_match")):
        reference = _lm_eval_reference(world.model, world.tokenizer, world.tasks, task)
        theirs = reference["results"][task][f"{metric},none"]
        assert report.categories[task].n == N_ROWS
        assert report.categories[task].accuracy == pytest.approx(100.0 * theirs, abs=1e-9)
        _assert_rows_match_samples(report, reference, task, metric)
    gen_rows = [r for r in report.rows if r.category == GEN_TASK]
    assert all(r.kind == "generate" and r.output is not None for r in gen_rows)


def test_cli_base_and_adapter_against_peft_reference(world, tmp_path):
    """--base-model + --adapter + --lm-eval-tasks: the tuned score equals lm-eval on PEFT's own model."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(seed=7), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at zero (a no-op adapter); random B makes the adapter matter
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    out = tmp_path / "report.json"
    code = cli.run(["--model", str(world.model_dir), "--adapter", str(adapter), "--base-model", str(world.model_dir),
                    "--lm-eval-tasks", MC_TASK, "--lm-eval-include", str(world.tasks), "--max-drop", "100",
                    "--out", str(out), "--quiet", "--device", "cpu", "--batch-size", "4"])
    assert code == 0
    data = json.loads(out.read_text())
    reference = _lm_eval_reference(peft_model.eval(), world.tokenizer, world.tasks, MC_TASK)
    assert data["categories"][MC_TASK]["accuracy"] == pytest.approx(100.0 * reference["results"][MC_TASK]["acc,none"])
    assert MC_TASK in data["forgetting"]["categories"]
    rows = [r for r in data["rows"] if r["category"] == MC_TASK]
    by_line = {r["line"]: r["correct"] for r in rows}
    assert by_line == {s["doc_id"] + 1: bool(s["acc"]) for s in reference["samples"][MC_TASK]}


def test_base_scores_are_cached(world, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    spec = LmEvalSpec((MC_TASK,), str(world.tasks))
    first = score_lm_eval_tasks(world.model, world.tokenizer, spec, cache=True, batch_size=4)
    again = score_lm_eval_tasks(world.model, world.tokenizer, spec, cache=True, batch_size=4)
    assert not first.timing["cached"] and again.timing["cached"]
    assert again.categories == first.categories


def test_unknown_task_exits_2_naming_close_names_before_the_model_loads(world, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the task names were checked")

    monkeypatch.setattr(cli, "load_model", no_model)
    monkeypatch.setattr(cli, "_resolve_model", no_model)
    code = cli.run(["--model", str(world.model_dir), "--lm-eval-tasks", f"{MC_TASK}x,arc_easyy",
                    "--lm-eval-include", str(world.tasks), "--out", str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"'{MC_TASK}x' (closest: {MC_TASK}" in err and "'arc_easyy' (closest: arc_easy" in err
    assert "Traceback" not in err


def test_trainer_preflight_rejects_unknown_task(world):
    from trainer.config import ConfigError
    from trainer.preflight import check_suites

    cfg = SimpleNamespace(capability_suite=f"lm-eval:{world.tasks}:{MC_TASK}_", capability_task=None)
    with pytest.raises(ConfigError, match=f"capability_suite=.*closest: {MC_TASK}"):
        check_suites(cfg)
    check_suites(SimpleNamespace(capability_suite=f"lm-eval:{world.tasks}:{MC_TASK}", capability_task=None))


def test_missing_dataset_gives_a_clear_message(world, tmp_path, capsys):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # tests/conftest.py
    with pytest.raises(LmEvalTaskError, match=f"'{HUB_TASK}'.*dataset forgetless-test/never-cached.*offline"):
        check_lm_eval_spec(LmEvalSpec((HUB_TASK,), str(world.tasks)))
    code = cli.run(["--model", str(world.model_dir), "--lm-eval-tasks", NO_DATA_TASK,
                    "--lm-eval-include", str(world.tasks), "--out", str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"lm-eval task '{NO_DATA_TASK}'" in err and "gone.jsonl" in err and "Traceback" not in err


def test_trainer_run_scores_and_gates_lm_eval_tasks(world, tmp_path, capsys):
    """capability_suite=lm-eval:DIR:TASK: a LoRA run ends with the task as a gated category."""
    from trainer.run import main as train_main

    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w}>", "completion": w[::-1]}) + "\n"
                            for w in ("abc", "hello", "tiny", "llama", "model", "tasks", "gate", "score")))
    out = tmp_path / "run"
    code = train_main([f"model={world.model_dir}", f"data={data}", f"output_dir={out}", "method=lora", "max_steps=2",
                       "per_device_train_batch_size=4", "validation_split=0", "max_length=32", "device=cpu",
                       "lora_r=4", "progress=false", "replay_ratio=0",
                       f"capability_suite=lm-eval:{world.tasks}:{MC_TASK}", "capability_max_drop=100"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "forgetting_report.json").read_text())
    assert list(report["categories"]) == [MC_TASK] and report["categories"][MC_TASK]["n"] == N_ROWS
    assert report["forgetting"]["passed"] and MC_TASK in report["forgetting"]["categories"]
    assert report["model"]["adapter"]


def test_target_task_suite_is_scored_alongside(world, tmp_path):
    """A sequence's stage scores capability_suite=lm-eval:... with its task suite (report.task)."""
    suite = tmp_path / "task.jsonl"
    suite.write_text("".join(json.dumps(r) + "\n" for r in [
        {"_meta": {"name": "target", "version": "1"}},
        {"category": "task", "prompt": "Q: 1 plus 2?\nA:", "choices": [" 3", " 4"], "answer_index": 0},
        {"category": "task", "prompt": "Q: 2 plus 3?\nA:", "choices": [" 6", " 5"], "answer_index": 1}]))
    alone = ev.score_model(world.model, world.tokenizer, suite)
    report = ev.score_model(world.model, world.tokenizer, f"lm-eval:{world.tasks}:{MC_TASK}", task=suite)
    assert list(report.categories) == [MC_TASK]
    assert report.task.name == "target" and report.task.n == 2
    assert report.task.accuracy == alone.overall_accuracy
    assert [r.correct for r in report.rows if r.category == "task"] == [r.correct for r in alone.rows]


def test_without_lm_eval_the_error_names_the_pip_command(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    code = cli.run(["--model", str(world.model_dir), "--lm-eval-tasks", "arc_easy", "--out", str(tmp_path / "r.json"),
                    "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'forgetless[lm-eval]'" in err and "Traceback" not in err
