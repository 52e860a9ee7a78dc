"""Interpolation to the gate: the mixes against independently loaded models (HF from_pretrained,
PEFT's loader, a float64 merge), the memory bound of the full mix (tensors read and alive), the
choice of alpha on hand-made curves, the saved model/adapter, the CLI's exit codes, and the
trainer's interpolate=auto."""
import json
import weakref
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_eval_generate import reference_greedy
from tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

import eval.capability as capability
import eval.interpolate as interp
from eval.interpolate import FullInterpolation, LoRAInterpolation, chosen_alpha, run, scan_alphas
from eval.report import CapabilityReport, CategoryScore, FormatRigidity, TaskScore
from kernels.lora_layers import apply_lora, lora_modules
from kernels.peft_format import load_adapter, save_adapter

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[5, 77, 120, 3, 250, 41, 9], [200, 14, 66, 66, 1, 130, 88]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


# ------------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp_lora")
    tiny_llama(seed=3).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    model = apply_lora(tiny_llama(seed=3), r=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen))
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=gen))
    save_adapter(model, root / "adapter")
    return root


def float64_merge(base_dir, adapter_dir, alpha: float) -> torch.Tensor:
    """Reference: the base in float64 with alpha * (lora_alpha / r) * B @ A added to each target weight."""
    model = load(base_dir).double()
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    with torch.no_grad():
        for key, a in state.items():
            if key.endswith(".lora_A.weight"):
                path = key[len("base_model.model."):-len(".lora_A.weight")]
                b = state[key.replace("lora_A", "lora_B")]
                model.get_submodule(path).weight.add_(alpha * scale * (b.double() @ a.double()))
    return logits(model)


def test_lora_alpha_0_is_the_base_and_1_the_tuned_adapter_as_peft_loads_it(lora_world):
    model = load_adapter(load(lora_world / "base"), lora_world / "adapter")
    mix = LoRAInterpolation(model)
    mix.set_alpha(0.0)
    torch.testing.assert_close(logits(model), logits(load(lora_world / "base")), rtol=1e-5, atol=1e-5)
    mix.set_alpha(1.0)
    peft_tuned = PeftModel.from_pretrained(load(lora_world / "base"), str(lora_world / "adapter")).eval()
    torch.testing.assert_close(logits(model), logits(peft_tuned), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(model), logits(load(lora_world / "base")), atol=1e-2)  # the adapter matters
    mix.set_alpha(0.5)
    torch.testing.assert_close(logits(model).double(), float64_merge(lora_world / "base", lora_world / "adapter", 0.5),
                               rtol=1e-4, atol=1e-5)


def test_saved_lora_mix_folds_alpha_into_lora_b_and_reproduces_the_mix(lora_world, tmp_path):
    model = load_adapter(load(lora_world / "base"), lora_world / "adapter")
    mix = LoRAInterpolation(model)
    mix.set_alpha(0.4)
    mixed = logits(model)
    saved = mix.save(0.4, tmp_path / "adapter", tiny_tokenizer())
    config, original = (json.loads((p / "adapter_config.json").read_text()) for p in (saved, lora_world / "adapter"))
    assert (config["r"], config["lora_alpha"]) == (original["r"], original["lora_alpha"])  # scale untouched
    ours, theirs = (load_file(str(p / "adapter_model.safetensors")) for p in (saved, lora_world / "adapter"))
    for key in theirs:
        factor = 0.4 if ".lora_B." in key else 1.0
        torch.testing.assert_close(ours[key], factor * theirs[key], rtol=0, atol=1e-7)
    peft_mix = PeftModel.from_pretrained(load(lora_world / "base"), str(saved)).eval()
    torch.testing.assert_close(logits(peft_mix), mixed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(load_adapter(load(lora_world / "base"), saved)), mixed, rtol=1e-5, atol=1e-5)
    # the model itself is left as it was: still the mix at 0.4, with the trained B
    torch.testing.assert_close(logits(model), mixed, rtol=0, atol=0)
    trained_b = {f"base_model.model.{p}.lora_B.weight": layer.lora_B for p, layer in lora_modules(model)}
    for key, b in trained_b.items():
        assert torch.equal(b.detach(), theirs[key])


# ------------------------------------------------------------------------------- full


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def full_world(request, tmp_path_factory):
    """A base and a 'tuned' model of the same architecture (GPT-2: tied lm_head, Conv1D)."""
    build = {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]
    root = tmp_path_factory.mktemp(f"interp_full_{request.param}")
    for name, seed in (("base", 3), ("tuned", 4)):
        build(seed=seed).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root


def test_full_alpha_0_and_1_reproduce_the_two_checkpoints_and_half_is_their_mean(full_world):
    model = load(full_world / "tuned")
    mix = FullInterpolation(model, full_world / "base", full_world / "tuned")
    mix.set_alpha(0.0)
    torch.testing.assert_close(logits(model), logits(load(full_world / "base")), rtol=0, atol=0)
    mix.set_alpha(1.0)
    torch.testing.assert_close(logits(model), logits(load(full_world / "tuned")), rtol=0, atol=0)
    mix.set_alpha(0.5)
    base_sd, tuned_sd = load(full_world / "base").state_dict(), load(full_world / "tuned").state_dict()
    mean = {k: ((base_sd[k].double() + tuned_sd[k].double()) / 2).to(v.dtype) if v.is_floating_point() else v
            for k, v in base_sd.items()}
    fresh = load(full_world / "base")
    fresh.load_state_dict(mean)
    torch.testing.assert_close(logits(model), logits(fresh), rtol=1e-6, atol=1e-6)


def test_full_mix_reads_two_tensors_at_a_time_never_two_extra_models(full_world, monkeypatch):
    """Every read goes through SafetensorsFiles.get; count them, and how many are alive at once."""
    live, peak, reads = [0], [0], []
    original = interp.SafetensorsFiles.get

    def counted(self, key):
        tensor = original(self, key)
        reads.append(key)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(tensor, lambda: live.__setitem__(0, live[0] - 1))
        return tensor

    monkeypatch.setattr(interp.SafetensorsFiles, "get", counted)
    model = load(full_world / "tuned")
    n_params = len(list(model.parameters()))
    mix = FullInterpolation(model, full_world / "base", full_world / "tuned")
    assert reads == []  # building the index reads shapes only
    for alpha in (0.25, 0.75):
        mix.set_alpha(alpha)
    assert len(reads) == 2 * 2 * n_params  # one base + one tuned tensor per parameter and alpha
    assert peak[0] <= 2 and live[0] == 0


def test_saved_full_mix_reproduces_the_mix(full_world, tmp_path):
    model = load(full_world / "tuned")
    mix = FullInterpolation(model, full_world / "base", full_world / "tuned")
    mix.set_alpha(0.3)
    mixed = logits(model)
    saved = mix.save(0.3, tmp_path / "model", tiny_tokenizer())
    assert (saved / "model.safetensors").is_file() and (saved / "tokenizer.json").is_file()
    torch.testing.assert_close(logits(load(saved)), mixed, rtol=0, atol=0)
    assert not list(tmp_path.glob(".*"))  # staging folder renamed away


def test_full_mix_refuses_another_architecture(full_world, tmp_path):
    tiny_llama(seed=3, hidden_size=32, intermediate_size=40).save_pretrained(tmp_path / "other")
    with pytest.raises(interp.InterpolationError, match="shape"):
        FullInterpolation(load(full_world / "tuned"), tmp_path / "other", full_world / "tuned")
    (tmp_path / "empty").mkdir()
    with pytest.raises(interp.InterpolationError, match="no \\*.safetensors"):
        FullInterpolation(load(full_world / "tuned"), tmp_path / "empty", full_world / "tuned")


# ------------------------------------------------------------------------------- the choice


def report(scores: dict[str, float], task: float = 0.0, rigidity: float = 10.0) -> CapabilityReport:
    cats = {k: CategoryScore(n=100, correct=round(v), accuracy=v) for k, v in scores.items()}
    return CapabilityReport(
        run_name="r", model={}, suite={"hash": "s"}, categories=cats, overall_accuracy=0.0, macro_accuracy=0.0,
        task=TaskScore(name="t", path="t", hash="t", n=100, correct=round(task), accuracy=task),
        format_rigidity=FormatRigidity(task_format="^X", n=100, in_format=round(rigidity), rate=rigidity))


BASE = report({"facts": 80.0, "chat": 70.0}, task=0.0, rigidity=10.0)


def linear_curve(seen: list[float]):
    """facts drops 12 points per unit of alpha, chat 4: with max_drop 5, alpha passes iff 12 alpha <= 5."""
    def score_at(alpha: float) -> CapabilityReport:
        seen.append(alpha)
        return report({"facts": 80 - 12 * alpha, "chat": 70 - 4 * alpha}, task=100 * alpha)
    return score_at


def test_the_largest_passing_grid_alpha_is_chosen():
    seen = []
    points, _ = scan_alphas(linear_curve(seen), BASE, [0, 0.25, 0.5, 0.75, 1], max_drop=5)
    assert seen == [0, 0.25, 0.5, 0.75, 1]
    assert [p.passed for p in points] == [True, True, False, False, False]
    assert chosen_alpha(points) == 0.25
    p = points[2]
    assert (p.task_score, p.worst_category, p.failed) == (50.0, "facts", ["facts"])
    assert p.worst_forgetting == pytest.approx(6.0) and p.mean_forgetting == pytest.approx(4.0)
    assert p.target_gain == 50.0


@pytest.mark.parametrize("steps, scored, best", [
    (2, [0.375, 0.4375], 0.375),  # 4.5 passes, 5.25 fails
    (3, [0.375, 0.4375, 0.40625], 0.40625),  # then the middle of [0.375, 0.4375]: 4.875 passes
])
def test_bisection_refines_between_the_last_pass_and_the_first_fail(steps, scored, best):
    seen = []
    points, _ = scan_alphas(linear_curve(seen), BASE, [0, 0.25, 0.5, 0.75, 1], max_drop=5, refine=steps)
    assert seen[5:] == scored and chosen_alpha(points) == best
    assert [p.alpha for p in points if p.refined] == sorted(scored)
    assert [p.alpha for p in points] == sorted(seen)


def test_a_non_monotone_curve_still_gives_the_largest_passing_alpha():
    drops = {0.0: 0.0, 0.25: 6.0, 0.5: 3.0, 0.75: 7.0, 1.0: 9.0, 0.625: 4.0}
    seen = []

    def score_at(alpha):
        seen.append(alpha)
        return report({"facts": 80 - drops[alpha], "chat": 70.0})

    points, _ = scan_alphas(score_at, BASE, sorted(drops)[:2] + [0.5, 0.75, 1.0], max_drop=5, refine=1)
    assert seen[-1] == 0.625 and chosen_alpha(points) == 0.625


def test_format_rigidity_rise_is_gated_and_a_rise_equal_to_the_bound_passes():
    def score_at(alpha):  # no category drops; rigidity rises 40 points per unit of alpha
        return report({"facts": 80.0, "chat": 70.0}, rigidity=10 + 40 * alpha)

    points, _ = scan_alphas(score_at, BASE, [0, 0.25, 0.5, 1], max_drop=5, max_format_rigidity=10)
    assert [p.format_rigidity_rise for p in points] == [0.0, 10.0, 20.0, 40.0]
    assert [p.passed for p in points] == [True, True, False, False]
    assert points[2].failed == ["format_rigidity"] and chosen_alpha(points) == 0.25
    no_bound, _ = scan_alphas(score_at, BASE, [1], max_drop=5)
    assert no_bound[0].passed


def test_when_nothing_passes_the_summary_says_why():
    failing = lambda alpha: report({"facts": 74.0, "chat": 70.0})  # noqa: E731 - a 6-point drop everywhere
    points, _ = scan_alphas(failing, BASE, [0, 1], max_drop=5)
    result = interp.InterpolationResult(kind="full", points=points, chosen_alpha=chosen_alpha(points), max_drop=5,
                                        max_format_rigidity=None, base={}, tuned={})
    assert not result.passed and "not even alpha 0" in result.summary() and "base fails its own gate" in result.summary()
    points, _ = scan_alphas(failing, BASE, [0.5, 1], max_drop=5)
    result.points = points
    assert "add 0 or smaller alphas" in result.summary()


# ------------------------------------------------------------------------------- CLI, end to end


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPTS = ["Capital of France?", "2+2=", "Name a colour:", "Who wrote Hamlet?", "Spell cat:", "The sky is"]


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory):
    """A base and a different 'tuned' model; the suite's answers are the base's greedy outputs
    (so any change in them is forgetting), the task's the tuned model's (learning)."""
    root = tmp_path_factory.mktemp("interp_cli")
    for name, seed in (("base", 1), ("tuned", 2)):
        tiny_llama(seed=seed, initializer_range=0.2).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    base, tuned, tok = load(root / "base"), load(root / "tuned"), tiny_tokenizer()
    ref_base = {p: reference_greedy(base, tok, p, 4) for p in PROMPTS}
    ref_tuned = {p: reference_greedy(tuned, tok, p, 4) for p in PROMPTS}
    differ = [p for p in PROMPTS if ref_base[p] != ref_tuned[p]]
    assert len(differ) >= 3
    _jsonl(root / "suite.jsonl", [{"category": f"c{i % 2}", "prompt": p, "answer": ref_base[p], "max_new_tokens": 4}
                                  for i, p in enumerate(differ)])
    _jsonl(root / "task.jsonl", [{"category": "task", "prompt": p, "answer": ref_tuned[p], "max_new_tokens": 4}
                                 for p in differ])
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--base-model", str(root / "base"), "--suite", str(root / "suite.jsonl"), "--task",
            str(root / "task.jsonl"), "--out", str(out), "--quiet", *extra]


def test_cli_full_picks_the_base_side_when_the_tuned_side_forgets(cli_world, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = run(_args(cli_world, out, "--model", str(cli_world / "tuned"), "--max-drop", "0", "--alphas", "1,0"))
    assert code == 0
    curve = json.loads((out / "interpolation.json").read_text())
    assert curve["schema"] == "forgetless.eval.interpolation/1" and curve["kind"] == "full"
    assert [(p["alpha"], p["passed"], p["task_score"]) for p in curve["points"]] == [(0.0, True, 0.0),
                                                                                     (1.0, False, 100.0)]
    assert curve["chosen_alpha"] == 0.0 and curve["passed"] and (out / "interpolation.png").stat().st_size > 0
    saved, base = load(out / "model").state_dict(), load(cli_world / "base").state_dict()
    assert all(torch.equal(saved[k], base[k]) for k in base)  # alpha 0 is the base, bit for bit
    assert json.loads((out / "report.json").read_text())["forgetting"]["passed"]

    code = run(_args(cli_world, tmp_path / "out1", "--model", str(cli_world / "tuned"), "--max-drop", "0",
                     "--alphas", "1"))
    assert code == 1 and not (tmp_path / "out1" / "model").exists()
    assert json.loads((tmp_path / "out1" / "interpolation.json").read_text())["chosen_alpha"] is None


def test_cli_lora_scores_the_base_once_across_runs(cli_world, lora_world, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    calls = []
    original = capability._score_rows
    monkeypatch.setattr(capability, "_score_rows", lambda *a, **k: calls.append(1) or original(*a, **k))
    args = ["--base-model", str(lora_world / "base"), "--adapter", str(lora_world / "adapter"), "--suite",
            str(cli_world / "suite.jsonl"), "--max-drop", "100", "--quiet"]
    assert run([*args, "--out", str(tmp_path / "a")]) == 0
    assert len(calls) == 1 + 5  # the base, then the five alphas of the default grid
    assert run([*args, "--out", str(tmp_path / "b"), "--alphas", "0.5,1"]) == 0
    assert len(calls) == 6 + 2  # the base came from the cache
    curve = json.loads((tmp_path / "b" / "interpolation.json").read_text())
    assert curve["chosen_alpha"] == 1.0 and curve["lora_scale_folded_into"] == "lora_B"
    saved = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    original_state = load_file(str(lora_world / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], original_state[k]) for k in original_state)


@pytest.mark.parametrize("extra, message", [
    (["--alphas", "0,2"], "alphas must lie in [0, 1]"),
    (["--alphas", "0,x"], "expected comma-separated numbers"),
    (["--max-drop", "-1"], "max_drop must be >= 0"),
    (["--refine", "-1"], "refine must be >= 0"),
    (["--max-format-rigidity", "5"], "needs the task's answer format"),
])
def test_cli_bad_input_is_exit_2_with_a_message(cli_world, tmp_path, capsys, extra, message):
    args = _args(cli_world, tmp_path / "out", "--model", str(cli_world / "tuned"), "--max-drop", "5")
    assert run(args + extra) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_directories_are_exit_2(cli_world, tmp_path, capsys):
    assert run(_args(cli_world, tmp_path / "o", "--model", str(tmp_path / "nope"), "--max-drop", "5")) == 2
    assert "not a directory" in capsys.readouterr().err
    assert run(_args(cli_world, tmp_path / "o", "--adapter", str(tmp_path), "--max-drop", "5")) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: exactly one of --adapter / --model
        run(_args(cli_world, tmp_path / "o", "--max-drop", "5"))
    assert exc.value.code == 2


# ------------------------------------------------------------------------------- the trainer


def test_trainer_interpolate_auto_writes_the_curve_beside_the_run(tmp_path, monkeypatch):
    from test_trainer_e2e import make_workspace

    from trainer.run import main

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    ws = make_workspace(tmp_path / "ws", n_task=8)
    suite = _jsonl(tmp_path / "suite.jsonl", [{"category": "copy", "prompt": "cat>", "answer": "tac"},
                                              {"category": "pick", "prompt": "sun>", "choices": ["nus", "sun"],
                                               "answer_index": 0}])
    common = [f"model={ws['model']}", f"data={ws['task']}", "method=full", "max_steps=2", "progress=false",
              "per_device_train_batch_size=2", "device=cpu", f"capability_suite={suite}", "interpolate=auto"]
    assert main([*common, f"output_dir={tmp_path / 'bad'}"]) == 2  # no capability_max_drop: no gate to mix to
    assert main([*common, f"output_dir={tmp_path / 'run'}", "capability_max_drop=100"]) == 0
    curve = json.loads((tmp_path / "run" / "interpolation" / "interpolation.json").read_text())
    assert curve["kind"] == "full" and curve["chosen_alpha"] == 1.0
    assert [p["alpha"] for p in curve["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (tmp_path / "run" / "interpolation" / "model" / "model.safetensors").is_file()
