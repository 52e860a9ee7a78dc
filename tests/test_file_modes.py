"""Written files follow the umask, like any other tool's: 0666 / 0777 minus the umask.

Writers that go through a private temporary file (safetensors' save_file, mkstemp, mkdtemp)
leave 0600 / 0700 unless the project fixes the mode; the expected modes here are computed by
hand from the umask the test sets, under two different umasks.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_trainer_e2e import make_workspace, run_config

from trainer.loop import train
from trainer.run import forgetting_report

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("file_modes"), n_task=12, n_general=8)


@pytest.fixture
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_suite(path: Path) -> Path:
    path.write_text('{"category": "copy", "prompt": "cat>", "answer": "tac"}\n'
                    '{"category": "pick", "prompt": "sun>", "choices": ["nus", "sun"], "answer_index": 0}\n')
    return path


def assert_modes(root: Path, names: list[str], umask: int) -> None:
    files = {0o027: 0o640, 0o002: 0o664}[umask]  # 0666 & ~umask, by hand
    dirs = {0o027: 0o750, 0o002: 0o775}[umask]  # 0777 & ~umask
    for name in names:
        path = root / name
        assert path.exists(), name
        assert oct(mode(path)) == oct(dirs if path.is_dir() else files), name
    for path in root.rglob("*"):  # and nothing else the run wrote is private
        assert oct(mode(path)) == oct(dirs if path.is_dir() else files), path


@pytest.mark.parametrize("umask", [0o027], indirect=True)
def test_lora_run_outputs_follow_the_umask(ws, tmp_path, umask):
    out = tmp_path / "lora"
    cfg = run_config(ws, out, method="lora", max_steps=2, save_steps=1, capability_suite=str(write_suite(
        tmp_path / "suite.jsonl")), capability_max_drop=100.0)
    result = train(cfg)
    assert forgetting_report(cfg, result) == 0
    assert_modes(out, ["adapter", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                       "forgetting_report.json", "forgetting_report.md", "forgetting_report.png",
                       "checkpoint-2", "checkpoint-2/trainable.safetensors", "checkpoint-2/state.pt",
                       "checkpoint-2/trainer_state.json", "metrics.jsonl", "config.yaml"], umask)


@pytest.mark.parametrize("umask", [0o002], indirect=True)
def test_full_and_ewc_outputs_follow_the_umask(ws, tmp_path, umask):
    out = tmp_path / "ewc"
    train(run_config(ws, out, method="ewc", max_steps=2, save_steps=2, early_stopping_patience=1,
                     eval_steps=1, validation_split=0.2, fisher_data=str(ws["general"])))
    fisher = list(out.glob("fisher-*.safetensors"))
    assert len(fisher) == 1
    assert_modes(out, ["model", "model/model.safetensors", "model/config.json", fisher[0].name,
                       "checkpoint-2/trainable.safetensors", "checkpoint-2/best.safetensors"], umask)
