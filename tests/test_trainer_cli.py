"""The command line as a user meets it: --help, YAML + overrides, and every bad input giving a
message and a non-zero exit without a traceback (run in a subprocess)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_trainer_e2e import make_workspace

from trainer.config import ConfigError, TrainConfig, parse_args

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "trainer.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("trainer_cli"), n_task=12, n_general=8)


def test_help_lists_every_key_with_its_default_and_the_demo_value_beside_it():
    out = run_cli("--help")
    assert out.returncode == 0
    for f in dataclasses.fields(TrainConfig):
        assert f"  {f.name}=" in out.stdout, f.name
    assert "peak AdamW learning rate" in out.stdout
    lines = {line.split("=")[0].strip(): line for line in out.stdout.splitlines() if line.startswith("  ") and "=" in line}
    # The defaults a bare `python -m trainer.run` actually runs with (the demo's), beside the dataclass's.
    assert re.fullmatch(r"  learning_rate=0\.001 +demo: 0\.005", lines["learning_rate"])
    assert re.fullmatch(r"  max_steps=0 +demo: 600", lines["max_steps"])
    assert re.fullmatch(r"  replay_ratio=0\.0 +demo: 0\.2", lines["replay_ratio"])
    assert lines["seed"] == "  seed=0"


def test_yaml_then_overrides_with_types_coerced(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": "2e-4", "method": "full", "lora_targets": ["q_proj"],
                                    "bf16": False, "max_steps": 7}))
    cfg = parse_args(["--config", str(path), "max_steps=9", "lora_targets=q_proj,v_proj", "use_rslora=true"])
    assert (cfg.learning_rate, cfg.method, cfg.max_steps, cfg.bf16) == (2e-4, "full", 9, "false")
    assert cfg.lora_targets == ["q_proj", "v_proj"] and cfg.use_rslora is True
    with pytest.raises(ConfigError, match="did you mean learning_rate"):
        parse_args(["--config", str(path), "learning_rat=1"])
    path.write_text("warmup_step: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'warmup_step' \(config file\); did you mean warmup_steps"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("args, message", [
    (["learnng_rate=1e-3"], "unknown config key 'learnng_rate' (command line); did you mean learning_rate"),
    (["max_steps=ten"], "max_steps='ten': expected int"),
    (["method=qlora"], "method='qlora': must be one of full, lora, ewc, lora_ewc"),
    (["replay_ratio=1.5", "data=x.jsonl"], "replay_ratio=1.5: must be in [0, 1)"),
    (["model=/nonexistent/dir", "data=x.jsonl"], "data=x.jsonl: file not found"),
    (["output_dir="], "output_dir is empty"),
    (["--max_steps", "10"], "cannot read argument '--max_steps': expected key=value or --config FILE.yaml "
                            "(write max_steps=10)"),
])
def test_bad_config_is_a_message_and_exit_2(args, message):
    out = run_cli(*args, "progress=false")
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n', "bad.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "bad.jsonl:2: missing field 'completion'"),
    ('{"prompt": "a", "completion": ""}\n', "bad.jsonl:1: empty completion"),
    ("", "bad.jsonl: empty file"),
])
def test_bad_data_is_file_line_message_and_exit_2(ws, tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = run_cli(f"model={ws['model']}", f"data={bad}", f"output_dir={tmp_path / 'out'}", "progress=false")
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_nan_loss_stops_with_a_message_keeping_the_last_checkpoint(ws, tmp_path):
    # In-process (the exit code for TrainingDiverged is main()'s one line); a learning rate of
    # 1e30 blows the weights up in the first update, so step 1's checkpoint is the last good one.
    from test_trainer_e2e import run_config

    from trainer.loop import TrainingDiverged, train

    cfg = run_config(ws, tmp_path / "out", method="full", learning_rate=1e30, max_grad_norm=0.0, save_steps=1,
                     max_steps=5, per_device_train_batch_size=2)
    with pytest.raises(TrainingDiverged, match=r"became (nan|inf) at step 2; training stopped, the last good "
                                               r"checkpoint is .*checkpoint-1"):
        train(cfg)
    assert (tmp_path / "out" / "checkpoint-1" / "trainable.safetensors").exists()
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_a_cli_run_prints_config_summary_and_saves_config_yaml_and_the_forgetting_report(ws, tmp_path):
    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"category": "copy", "prompt": "cat>", "answer": "tac"}\n'
                     '{"category": "pick", "prompt": "sun>", "choices": ["nus", "sun"], "answer_index": 0}\n')
    out = run_cli(f"model={ws['model']}", f"data={ws['task']}", f"output_dir={tmp_path / 'out'}", "method=lora",
                  "max_steps=2", "per_device_train_batch_size=2", "progress=false", "lora_r=2",
                  f"capability_suite={suite}", "capability_max_drop=100")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PASS" in out.stdout
    report = json.loads((tmp_path / "out" / "forgetting_report.json").read_text())
    assert set(report["forgetting"]["categories"]) == {"copy", "pick"}
    # The report names what was scored: the base plus the adapter this run saved, and its own hash.
    assert report["model"]["path"] == str(ws["model"])
    assert report["model"]["adapter"] == str(tmp_path / "out" / "adapter")
    assert re.fullmatch(r"[0-9a-f]{40}", report["model"]["hash"])
    assert report["model"]["hash"] != report["forgetting"]["baseline_model_hash"]
    assert "\n  model: " in out.stdout and "tokens/s" in out.stdout and "peak memory" in out.stdout
    # The printed config marks what the user set; defaults stay unmarked.
    assert re.search(r"^  lora_r: 2 +\[you\]$", out.stdout, re.M) and re.search(r"^  seed: 0$", out.stdout, re.M)
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["lora_r"] == 2 and saved["data"] == str(ws["task"])
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()


def test_report_of_a_full_fine_tune_names_the_saved_model_and_its_hash(ws, tmp_path):
    from test_trainer_e2e import run_config
    from transformers import AutoModelForCausalLM

    from eval.cache import model_hash
    from trainer.loop import train
    from trainer.run import forgetting_report

    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"category": "copy", "prompt": "cat>", "answer": "tac"}\n')
    cfg = run_config(ws, tmp_path / "out", method="full", max_steps=2, capability_suite=str(suite),
                     capability_max_drop=100.0)
    forgetting_report(cfg, train(cfg))
    report = json.loads((tmp_path / "out" / "forgetting_report.json").read_text())
    saved = tmp_path / "out" / "model"
    assert report["model"] == {"path": str(saved), "adapter": None,
                               "hash": model_hash(AutoModelForCausalLM.from_pretrained(saved))}
    assert report["forgetting"]["baseline_model_hash"] == model_hash(AutoModelForCausalLM.from_pretrained(ws["model"]))


def test_no_arguments_means_the_demo_lora_with_replay_and_the_report(tmp_path, monkeypatch):
    """The default run's config (issue 6): demo base, support task, 20% general replay, LoRA,
    the demo capability suite; keys the user sets win. Building the base (even the tiny recipe:
    ~40 s on a busy 2-core machine) is trainer.demo's to test; here it is replaced by a saved
    tiny model, and the recipe name passed through is checked."""
    import trainer.demo.base
    from trainer.config import parse_command_line
    from trainer.run import resolve_demo

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    asked = []
    saved = make_workspace(tmp_path, n_task=2, n_general=2)["model"]
    monkeypatch.setattr(trainer.demo.base, "ensure_base_model",
                        lambda progress=True, recipe="default": asked.append(recipe) or saved)
    cfg = resolve_demo(*parse_command_line(["demo_base=tiny", "progress=false"]))
    assert cfg.method == "lora" and cfg.replay_ratio == 0.2
    assert Path(cfg.data).name == "task_train.jsonl" and Path(cfg.eval_data).name == "task_val.jsonl"
    assert Path(cfg.replay_data).name == "general_train.jsonl" and Path(cfg.capability_suite).name == "suite.jsonl"
    assert cfg.model == str(saved) and asked == ["tiny"]
    own = resolve_demo(*parse_command_line(["demo_base=tiny", "replay_ratio=0", "capability_suite=none"]))
    assert own.replay_ratio == 0.0 and own.capability_suite is None
    mine = resolve_demo(*parse_command_line(["model=/my/model", "data=/my/task.jsonl"]))
    assert (mine.replay_ratio, mine.replay_data, mine.capability_suite) == (0.0, None, None)


def test_the_example_lora_ewc_config_is_the_measured_row():
    """configs/lora_ewc.yaml (the README's example) is the run docs/results.md measured at the
    600-step budget: the sweep's row "lora+ewc l100+replay" at max_steps=600. Compared after
    the demo's defaults are applied, as trainer.run and trainer.demo.compare both do."""
    from trainer.config import build_config, parse_command_line
    from trainer.run import demo_defaults_for

    sweep = yaml.safe_load((REPO / "configs" / "lora_ewc_sweep.yaml").read_text())
    (row,) = [r for r in sweep["runs"] if r["name"] == "lora+ewc l100+replay"]
    measured = {**sweep["common"], **{k: v for k, v in row.items() if k not in ("name", "note")}, "max_steps": 600}
    cfg, explicit = parse_command_line(["--config", str(REPO / "configs" / "lora_ewc.yaml")])
    ours = dataclasses.replace(cfg, **demo_defaults_for(cfg, explicit))
    ref = build_config(measured)
    ref = dataclasses.replace(ref, **demo_defaults_for(ref, set(measured)))
    ignore = {"output_dir", "progress", "fisher_data"}  # fisher_data unset = replay_data: the same file
    assert ours.fisher_data in (None, ours.replay_data)
    differ = {f.name: (getattr(ours, f.name), getattr(ref, f.name)) for f in dataclasses.fields(TrainConfig)
              if f.name not in ignore and getattr(ours, f.name) != getattr(ref, f.name)}
    assert differ == {}


# ---------------------------------------------------------------- checks before anything heavy


def main_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    """trainer.run.main in this process: an exception it did not turn into a message would
    fail the test here (what a traceback is in a subprocess)."""
    from trainer.run import main

    code = main([*args, "progress=false"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def no_model_work(monkeypatch, tmp_path):
    """Fail the test if anything would load, build or convert a model, or train."""
    import trainer.demo.base
    import trainer.loop

    def forbidden(*a, **k):
        raise AssertionError("model work started before the inputs were checked")

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(trainer.demo.base, "ensure_base_model", forbidden)
    monkeypatch.setattr(trainer.loop, "load_model", forbidden)
    monkeypatch.setattr(trainer.loop, "train", forbidden)


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_output_dir_that_is_a_file_is_exit_2_before_any_model_work(ws, tmp_path, capsys, no_model_work, where):
    taken = tmp_path / "taken"
    taken.write_text("not a directory\n")
    out_dir = taken if where == "file" else taken / "run"
    code, out, err = main_in_process([f"model={ws['model']}", f"data={ws['task']}", f"output_dir={out_dir}"], capsys)
    assert code == 2
    want = (f"output_dir={taken}: exists and is a file, not a directory" if where == "file"
            else f"output_dir={out_dir}: cannot be created, {taken} is a file, not a directory")
    assert want in err
    assert taken.read_text() == "not a directory\n"


def test_data_that_is_a_directory_says_so(ws, tmp_path, capsys, no_model_work):
    code, _, err = main_in_process([f"model={ws['model']}", f"data={tmp_path}", f"output_dir={tmp_path / 'o'}"],
                                   capsys)
    assert code == 2
    assert f"data={tmp_path}: is a directory; give a file" in err and "not found" not in err


@pytest.mark.parametrize("kind", ["missing", "file", "no_safetensors", "adapter", "output_dir"])
def test_a_bad_model_directory_is_reported_before_the_config_is_printed(ws, tmp_path, capsys, no_model_work, kind):
    model = tmp_path / "model"
    if kind == "file":
        model.write_text("{}")
    elif kind == "no_safetensors":
        model.mkdir()
        (model / "config.json").write_text("{}")
    elif kind == "adapter":  # what a LoRA run saves
        model.mkdir()
        (model / "adapter_config.json").write_text("{}")
        (model / "adapter_model.safetensors").write_bytes(b"")
    elif kind == "output_dir":  # a LoRA run's output_dir
        (model / "adapter").mkdir(parents=True)
        (model / "config.yaml").write_text("method: lora\n")
    code, out, err = main_in_process([f"model={model}", f"data={ws['task']}", f"output_dir={tmp_path / 'o'}"],
                                     capsys)
    assert code == 2
    want = {"missing": f"model={model}: no such directory", "file": f"model={model}: is a file",
            "no_safetensors": f"model={model}: no *.safetensors weights",
            "adapter": f"model={model}: is a LoRA adapter, not a model; give its base model as model=",
            "output_dir": f"model={model}: is a run's output_dir, not a model; the model it saved is "
                          f"{model / 'adapter'} (an adapter: its base model is the model)"}[kind]
    assert want in err
    assert "model:" not in out and "config (" not in out


@pytest.mark.parametrize("device, message", [
    ("gpu", "device='gpu': must be auto, cpu, cuda or cuda:N"),
    ("cuda:7", "device=cuda:7: torch"),
])
def test_a_device_torch_does_not_have_is_exit_2(ws, tmp_path, capsys, no_model_work, device, message):
    import torch

    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, _, err = main_in_process([f"model={ws['model']}", f"data={ws['task']}", f"output_dir={tmp_path / 'o'}",
                                    f"device={device}"], capsys)
    assert code == 2
    assert message in err


def test_a_path_starting_with_tilde_is_under_home(ws, tmp_path, capsys, monkeypatch, no_model_work):
    monkeypatch.setenv("HOME", str(tmp_path))
    code, _, err = main_in_process([f"model={ws['model']}", "data=~/mine.jsonl", "output_dir=~/out"], capsys)
    assert code == 2
    assert f"data={tmp_path / 'mine.jsonl'}: file not found" in err


def test_lora_targets_the_model_lacks_is_exit_2_naming_its_layers(ws, tmp_path, capsys):
    code, _, err = main_in_process([f"model={ws['model']}", f"data={ws['task']}", f"output_dir={tmp_path / 'o'}",
                                    "lora_targets=qkv", "max_steps=1", "device=cpu"], capsys)
    assert code == 2
    assert "lora_targets: apply_lora targets ['qkv'] match no module of LlamaForCausalLM" in err
    assert "q_proj" in err


def test_a_bad_capability_suite_fails_before_training(ws, tmp_path, capsys, no_model_work):
    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"category": "copy", "prompt": "cat>", "answer": "tac"}\n{"category": "copy"}\n')
    code, _, err = main_in_process([f"model={ws['model']}", f"data={ws['task']}", f"output_dir={tmp_path / 'o'}",
                                    f"capability_suite={suite}"], capsys)
    assert code == 2
    assert f"capability_suite: {suite}:2" in err


def test_bad_data_with_an_empty_cache_fails_in_seconds_without_building_the_base(tmp_path):
    """A subprocess on the real code (nothing patched), an empty cache, the default demo base:
    building that base takes minutes, so the timeout alone would catch a build; the cache must
    hold no base folder (finished or staging) afterwards."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    cache = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), FORGETLESS_CACHE=str(cache),
               HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "trainer.run", f"data={bad}", f"output_dir={tmp_path / 'o'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{bad}:2: missing field 'completion'" in out.stderr and "Traceback" not in out.stderr
    assert not [p.name for p in cache.iterdir() if "base-" in p.name] if cache.exists() else True
    assert "demo base" not in out.stdout


def test_demo_base_with_your_own_data_says_loudly_what_of_the_demo_is_still_used(tmp_path, capsys, monkeypatch):
    from trainer.run import prepare

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    mine = write_rows(tmp_path / "mine.jsonl", 3)
    cfg, sources = prepare([f"data={mine}", f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert "WARNING: model=demo with your own data=" in err
    assert "(replay_data=demo at replay_ratio=0.2, capability_suite=demo)" in err
    assert "turn them off with replay_ratio=0 capability_suite=none" in err
    # The demo task's validation rows and task suite describe a task this run does not train.
    assert cfg.eval_data is None and cfg.capability_task is None
    assert Path(cfg.replay_data).name == "general_train.jsonl"
    assert sources["data"] == "you" and sources["learning_rate"] == "demo" and "seed" not in sources
    quiet, _ = prepare([f"data={mine}", f"output_dir={tmp_path / 'o'}", "replay_ratio=0", "capability_suite=none"])
    assert "WARNING" not in capsys.readouterr().err and quiet.capability_suite is None


def test_your_own_model_with_demo_files_is_warned(ws, tmp_path, capsys, monkeypatch):
    from trainer.run import prepare

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    prepare(["--config", str(REPO / "configs" / "lora_ewc.yaml"), f"model={ws['model']}", f"data={ws['task']}",
             f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert f"WARNING: model={ws['model']} with the demo's files for replay_data" in err
    assert "set replay_data=... to your own files" in err


def write_rows(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"q{i}>", "completion": f"a{i}"}) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("name", ["lora", "full", "ewc", "lora_ewc"])
def test_example_configs_parse(name):
    cfg = parse_args(["--config", str(REPO / "configs" / f"{name}.yaml")])
    assert cfg.method == name


def test_weights_load_only_from_safetensors(ws, tmp_path):
    import shutil

    from test_trainer_e2e import run_config

    from trainer.loop import train

    pickled = tmp_path / "pickled"
    shutil.copytree(ws["model"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="no \\*.safetensors weights; forgetless loads weights only from safetensors"):
        train(run_config(ws, tmp_path / "out", model=str(pickled)))


def test_matrix_runners_select_rows_by_name_and_name_the_unknown_ones():
    from trainer.demo.compare import MatrixError, select_rows

    rows = [{"name": "full"}, {"name": "lora"}, {"name": "ewc"}]
    assert select_rows(rows, "", "m.yaml") == rows
    assert [r["name"] for r in select_rows(rows, " ewc, full ", "m.yaml")] == ["full", "ewc"]  # matrix order
    with pytest.raises(MatrixError, match=r"--only: no rows named nope, zzz in m.yaml"):
        select_rows(rows, "lora,zzz,nope", "m.yaml")
