"""Task sequences (issue 15) on a tiny random Llama: three stages, each a task with its own
constant answer (``a12>`` -> ``xx``, ``b7>`` -> ``yy``, ``c3>`` -> ``zz``), learnt in a dozen
steps, so the accuracy matrix moves.

References, all independent of the sequence's own numbers: every entry of R re-scored with
eval's ``score_model`` on the model each stage saved (loaded with HF's ``from_pretrained``, or
the base plus the adapter); ACC / BWT / FWT written out by hand from that R; the online Fisher
against a float64 per-sample gradient loop on the saved weights; resume against the
uninterrupted sequence run in the same test.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from test_trainer_e2e import make_workspace, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import eval as ev
from trainer import sequence
from trainer.data import tokenize_file

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = {"alpha": ("a", "xx"), "beta": ("b", "yy"), "gamma": ("c", "zz")}


def _task_files(root: Path, name: str) -> dict[str, Path]:
    letter, answer = TASKS[name]
    train = [{"prompt": f"{letter}{i}>", "completion": answer} for i in range(24)]
    suite = [{"_meta": {"name": name}}] + [{"category": "task", "prompt": f"{letter}{i}>", "answer": answer,
                                            "max_new_tokens": 3} for i in range(50, 56)]
    return {"data": write_jsonl(root / f"{name}.jsonl", train), "suite": write_jsonl(root / f"{name}_suite.jsonl", suite)}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence")
    ws = make_workspace(root)
    for name in TASKS:
        files = _task_files(root, name)
        ws[name], ws[f"{name}_suite"] = files["data"], files["suite"]
    caps = [{"_meta": {"name": "caps"}}]
    caps += [{"category": "echo", "prompt": f"{w}>", "answer": w[::-1], "max_new_tokens": 4} for w in ("cat", "dog")]
    caps += [{"category": "greet", "prompt": f"hi {w}>", "answer": "hello", "max_new_tokens": 6} for w in ("owl", "sun")]
    ws["caps"] = write_jsonl(root / "caps.jsonl", caps)
    return ws


def write_config(ws, path: Path, **shared) -> Path:
    config = dict(model=str(ws["model"]), method="full", max_steps=20, per_device_train_batch_size=4,
                  learning_rate=1e-2, lr_scheduler_type="constant", validation_split=0.0, max_length=32,
                  progress=False, device="cpu", lora_r=4, lora_alpha=8.0, per_device_eval_batch_size=8,
                  capability_suite=str(ws["caps"]))
    config.update(shared)
    config["stages"] = [{"name": n, "data": str(ws[n]), "capability_task": str(ws[f"{n}_suite"])} for n in TASKS]
    path.write_text(yaml.safe_dump(config))
    return path


def score(model, tokenizer, suite, task=None):
    model.eval()
    return ev.score_model(model, tokenizer, str(suite), task=str(task) if task else None)


def load_saved(base_dir: Path, saved_to: str):
    from kernels.peft_format import load_adapter

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if (Path(saved_to) / "adapter_config.json").is_file():
        model = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), saved_to)
    else:
        model = AutoModelForCausalLM.from_pretrained(saved_to)
    return model, tokenizer


@pytest.fixture(scope="module")
def full_run(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("full_run")
    code = sequence.main(["--config", str(write_config(ws, out / "seq.yaml")), f"output_dir={out / 'run'}"])
    return out / "run", code


def test_three_stages_R_is_what_each_stage_scores_and_metrics_match_a_hand_count(ws, full_run):
    out, code = full_run
    assert code == 0  # no gate asked for
    report = json.loads((out / "sequence_report.json").read_text())
    R, b, names = report["R"], report["b"], list(TASKS)
    assert report["tasks"] == names and len(R) == 3 and all(len(row) == 3 for row in R)
    tokenizer = AutoTokenizer.from_pretrained(ws["model"])
    base = AutoModelForCausalLM.from_pretrained(ws["model"])
    assert b == [score(base, tokenizer, ws[f"{n}_suite"]).overall_accuracy for n in names]
    for k, name in enumerate(names):
        stage_dir = out / f"stage-{k + 1}-{name}"
        done = json.loads((stage_dir / "stage_done.json").read_text())
        # Stage k+1 trained from the model stage k saved.
        assert done["model"] == (str(ws["model"]) if k == 0 else str(out / f"stage-{k}-{names[k - 1]}" / "model"))
        own = ev.read_report(stage_dir / "forgetting_report.json")  # the stage's own report
        assert R[k][k] == own.task.accuracy
        model, _ = load_saved(ws["model"], done["saved_to"])
        assert R[k][k] == score(model, tokenizer, ws["caps"], task=ws[f"{name}_suite"]).task.accuracy
        for j, other in enumerate(names):
            if j != k:
                assert R[k][j] == score(model, tokenizer, ws[f"{other}_suite"]).overall_accuracy, (k, j)
        assert report["capabilities"]["by_stage"][k] == {c: s.accuracy for c, s in own.categories.items()}
    assert R[0][0] == 100.0 and R[2][2] == 100.0 and R[2][0] < 100.0  # learnt, and forgotten
    m = report["metrics"]
    assert m["average_accuracy"] == pytest.approx((R[2][0] + R[2][1] + R[2][2]) / 3)
    assert m["backward_transfer"] == pytest.approx(((R[2][0] - R[0][0]) + (R[2][1] - R[1][1])) / 2)
    assert m["forward_transfer"] == pytest.approx(((R[0][1] - b[1]) + (R[1][2] - b[2])) / 2)
    forgetting = [max(R[0][0], R[1][0]) - R[2][0], R[1][1] - R[2][1]]
    assert m["forgetting_per_task"] == pytest.approx(forgetting)
    assert report["mean_forgetting_earlier"] == pytest.approx(sum(forgetting) / 2)
    for suffix in ("json", "md", "png"):
        assert (out / f"sequence_report.{suffix}").stat().st_size > 0


def test_a_task_gate_fails_the_sequence_with_exit_1(ws, full_run, capsys):
    out, _ = full_run  # rerun on the finished folder: every stage is kept, only the gate is new
    config = write_config(ws, out.parent / "gated.yaml", task_max_drop=5)
    # Another sequence (the gate differs) may not reuse the folder...
    assert sequence.main(["--config", str(config), f"output_dir={out}"]) == 2
    assert "holds another sequence" in capsys.readouterr().err
    # ... but the same one does, and its gate reads R: plain full fine-tuning forgot alpha.
    code = sequence.main(["--config", str(config), f"output_dir={out.parent / 'gated'}"])
    captured = capsys.readouterr().out
    assert code == 1 and "FAIL" in captured and "task alpha lost" in captured


def _per_sample_fisher(model_dir: Path, data: Path) -> dict[str, torch.Tensor]:
    """F = (1/N) sum_n (grad of the summed token log-likelihood of row n)^2, float64, one row at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = tokenize_file(data, tokenizer, 32).examples
    params = dict(model.named_parameters())
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        labels = torch.tensor([ex.labels])
        logits = model(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:]
        keep = target != -100
        loss = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                fisher[name] += g * g
    return {k: v / len(examples) for k, v in fisher.items()}


def _read_fisher(path: str) -> tuple[dict, dict]:
    fisher, anchors = {}, {}
    with safe_open(path, framework="pt") as fh:
        for key in fh.keys():
            kind, name = key.split(".", 1)
            (fisher if kind == "fisher" else anchors)[name] = fh.get_tensor(key)
    return fisher, anchors


def test_online_fisher_is_gamma_F_old_plus_F_new_anchored_at_the_stage_end(ws, tmp_path):
    gamma = 0.5
    config = write_config(ws, tmp_path / "ewc.yaml", method="ewc", ewc_lambda=10.0, ewc_online_gamma=gamma,
                          fisher_samples=64, fisher_data=str(ws["general"]), max_steps=6)
    assert sequence.main(["--config", str(config), f"output_dir={tmp_path / 'run'}"]) == 0
    done = [json.loads((tmp_path / "run" / f"stage-{k + 1}-{n}" / "stage_done.json").read_text())
            for k, n in enumerate(TASKS)]
    # After two stages: the penalty stage 3 trains under is gamma * (stage 2's) + F(task 2 at the
    # weights stage 2 ended with), anchored at those weights.
    for k in (1, 2):
        previous, _ = _read_fisher(done[k - 1]["fisher_file"])
        fisher, anchors = _read_fisher(done[k]["fisher_file"])
        end_dir = Path(done[k - 1]["saved_to"])
        new = _per_sample_fisher(end_dir, ws[list(TASKS)[k - 1]])
        end_weights = dict(AutoModelForCausalLM.from_pretrained(end_dir).named_parameters())
        assert set(fisher) == set(new) == set(anchors)
        for name in fisher:
            want = gamma * previous[name].double() + new[name]
            assert torch.allclose(fisher[name].double(), want, rtol=2e-4, atol=1e-7 * float(want.abs().max())), name
            assert torch.equal(anchors[name], end_weights[name].detach()), name


def _run(ws, out: Path, on_step_end=None, **shared):
    spec = sequence.parse_spec(["--config", str(write_config(ws, out.parent / f"{out.name}.yaml", **shared)),
                                f"output_dir={out}"])
    return sequence.run_sequence(spec, sequence.stage_configs(spec), on_step_end=on_step_end)


def test_resume_in_the_middle_of_stage_2_gives_the_same_R(ws, tmp_path, capsys):
    # LoRA carried from stage to stage (continue) with a replay buffer: the adapter, the buffer and
    # the optimizer state must all come back as they were.
    shared = dict(method="lora", lora_dropout=0.1, replay_ratio=0.25, max_steps=10)
    straight = _run(ws, tmp_path / "straight", replay_buffer=16, **shared)

    def stop(stage: int, step: int, record: dict) -> None:
        if (stage, step) == (1, 4):
            raise KeyboardInterrupt

    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        _run(ws, broken, on_step_end=stop, replay_buffer=16, **shared)
    assert (broken / "stage-1-alpha" / "stage_done.json").is_file()
    assert not (broken / "stage-2-beta" / "stage_done.json").exists()
    assert (broken / "stage-2-beta" / "checkpoint-4").is_dir()
    capsys.readouterr()
    resumed = _run(ws, broken, replay_buffer=16, **shared)
    # Stage 1 kept, stage 2 continued at step 5 (not retrained), its metrics one run's.
    log = capsys.readouterr().out
    assert "stage 1/3 alpha: finished before, kept" in log
    assert f"stage 2/3 beta: start (lora, resuming from {broken / 'stage-2-beta' / 'checkpoint-4'}" in log
    steps = [json.loads(line)["step"] for line in (broken / "stage-2-beta" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    assert resumed["R"] == straight["R"]
    assert resumed["capabilities"] == straight["capabilities"]
    # Stage 2 continued stage 1's adapter; stage 3 replayed a buffer of both earlier stages.
    done = json.loads((broken / "stage-2-beta" / "stage_done.json").read_text())
    assert done["init_adapter"] == str(broken / "stage-1-alpha" / "adapter")
    replayed = [json.loads(line) for line in (broken / "replay" / "stage-3.jsonl").read_text().splitlines()]
    earlier = {json.dumps(r) for n in ("alpha", "beta") for r in map(json.loads, ws[n].read_text().splitlines())}
    assert len(replayed) == 16 and all(json.dumps(r) in earlier for r in replayed)
    a, b = _final_adapter(straight), _final_adapter(resumed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _final_adapter(report: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(report["stages"][-1]["saved_to"]) / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["lora", "lora_ewc"])
def test_lora_merge_starts_each_stage_from_the_merged_weights(ws, tmp_path, method):
    extra = dict(fisher_data=str(ws["general"]), fisher_samples=16) if method == "lora_ewc" else {}
    report = _run(ws, tmp_path / "merge", method=method, lora_between="merge", max_steps=4, **extra)
    from kernels.lora_layers import merge_lora

    if method == "lora_ewc":  # the online Fisher of stage 2 is estimated on the merged weights stage 1 ended with
        second = report["stages"][1]
        assert second["wired"]["fisher"]["previous"] == report["stages"][0]["fisher_file"]
        _, anchors = _read_fisher(second["fisher_file"])
        merged = dict(AutoModelForCausalLM.from_pretrained(report["stages"][0]["merged"]).named_parameters())
        assert anchors and all(torch.equal(v, merged[k].detach()) for k, v in anchors.items())

    first = report["stages"][0]
    model, _ = load_saved(ws["model"], first["saved_to"])
    merged = AutoModelForCausalLM.from_pretrained(first["merged"])
    reference = dict(merge_lora(model).named_parameters())
    for name, p in merged.named_parameters():
        assert torch.allclose(p, reference[name], atol=1e-6), name
    assert report["stages"][1]["start"] == first["merged"] and report["stages"][1]["init_adapter"] is None


@pytest.mark.parametrize("change, message", [
    (lambda c: c["stages"][1].update(lerning_rate=1), "unknown config key 'lerning_rate'"),
    (lambda c: c["stages"][1].pop("data"), "missing data"),
    (lambda c: c["stages"][2].update(data="/nonexistent/task.jsonl"), "file not found"),
    (lambda c: c["stages"][1].update(method="lora"), "method cannot differ between stages"),
    (lambda c: c.update(method="lora_ewc"), "lora_ewc needs lora_between=merge"),
    (lambda c: c.update(replay_buffer=10), "replay_buffer=10 needs replay_ratio"),
    (lambda c: c.update(lora_between="stack"), "lora_between='stack'"),
    (lambda c: c.update(stages=[]), "non-empty list of stages"),
    (lambda c: c.update(previous_fisher="f.safetensors"), "set by the sequence"),
])
def test_a_bad_config_exits_2_with_a_message_before_any_training(ws, tmp_path, capsys, change, message):
    path = write_config(ws, tmp_path / "seq.yaml")
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))
    assert sequence.main(["--config", str(path), f"output_dir={tmp_path / 'out'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_init_adapter_trains_on_from_the_saved_adapter(ws, tmp_path):
    """The trainer key behind lora_between=continue: the adapter loaded, not a fresh one (whose B
    is zero); one step at a vanishing learning rate leaves it where it was."""
    from safetensors.torch import load_file
    from test_trainer_e2e import run_config

    from trainer.loop import train

    first = train(run_config(ws, tmp_path / "first", method="lora", max_steps=6))
    start = load_file(str(first.saved_to / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 1e-3 for k, v in start.items())
    again = train(run_config(ws, tmp_path / "again", method="lora", max_steps=1, learning_rate=1e-9,
                             init_adapter=str(first.saved_to)))
    after = load_file(str(again.saved_to / "adapter_model.safetensors"))
    assert after.keys() == start.keys() and all(torch.allclose(after[k], start[k], atol=1e-6) for k in start)


@pytest.mark.parametrize("name", ["sequence_demo.yaml", "sequence_smollm2.yaml"])
def test_the_shipped_sequence_configs_are_valid(name, tmp_path, monkeypatch):
    """Every key known, every stage complete, every file there (built into a private cache):
    what the sequence checks before it loads a model. The model itself is not built."""
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    config = Path(__file__).resolve().parents[1] / "configs" / name
    spec = sequence.parse_spec(["--config", str(config), f"output_dir={tmp_path / 'out'}"])
    stages = sequence.stage_configs(spec)
    assert len(stages) >= 2 and all(Path(s.cfg.data).is_file() and Path(s.cfg.capability_task).is_file()
                                    for s in stages)
