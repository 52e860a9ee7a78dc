"""``python -m trainer.sequence --config seq.yaml [key=value ...]`` (console script ``forgetless-sequence``).

Train task after task, each stage starting from the weights the previous one ended with, and
score every stage's task suite (seen and not yet seen) and the capability suite after every
stage: the accuracy matrix ``R[i][j]`` (score on task j after stage i) grows a row per stage,
and ``eval.sequences`` turns it into ACC, BWT, FWT and forgetting.

The config file is a trainer config (every key of ``python -m trainer.run --help``, shared by
all stages) plus ``stages:`` and the sequence's own keys::

    model: demo
    method: ewc
    max_steps: 300
    capability_suite: demo
    lora_between: continue     # LoRA: continue the same adapter | merge it and start a fresh one
    replay_buffer: 500         # at most N earlier-stage rows replayed at replay_ratio (0 = off)
    task_max_drop: 10          # gate: an earlier task may lose at most N points (forgetting)
    stages:
      - {name: tickets, data: demo, eval_data: demo, capability_task: demo}
      - {name: refunds, data: demo-task:refunds, capability_task: demo-task:refunds, learning_rate: 1e-3}

A stage needs ``name``, ``data`` and ``capability_task`` (its task suite); any other trainer key
in a stage overrides the shared value for that stage; ``key=value`` on the command line
overrides both (for every stage). Between stages (what the sequence sets, per stage):

- full / ewc: ``model`` = the previous stage's saved model directory;
- lora / lora_ewc: ``lora_between=continue``: the same base, ``init_adapter`` = the previous
  stage's adapter (it trains on); ``merge``: the previous adapter merged into its base
  (saved as ``merged/`` in that stage's folder) is the next ``model``, with a fresh adapter;
- ewc / lora_ewc (online EWC): stage 1's Fisher is the trainer's usual one (general data);
  stage k's is ``gamma * F_{k-1} + F(task k-1)``, the new term estimated on the previous
  stage's training rows at the weights that ended it, which are also the anchors
  (``previous_fisher``, ``fisher_data``, ``ewc_online_gamma`` of the trainer);
- ``replay_buffer=N``: ``trainer.replay_buffer`` (reservoir sample of the earlier stages'
  rows, seeded), written to ``replay/stage-K.jsonl`` and replayed as ``replay_data``; general
  rows given as ``replay_data`` join it (``replay_buffer_share`` of the file is the buffer),
  ``replay_data=self`` too: the answers of the model the stage starts from, generated (or read
  from the cache) before the stage trains;
- a chat model on chat rows with nothing said about replay (no ``replay_buffer``, ``replay_data``,
  ``replay_ratio`` or ``kl_to_base``): the chat default of ``trainer.run``, each stage replaying
  the answers of the model it starts from to the built-in prompt bank (``replay_ratio=0``: off).

Outputs in ``output_dir`` (default ``runs/sequence``): one folder per stage
(``stage-1-tickets/``: the stage's own run, its ``forgetting_report.{json,md,png}`` against the
sequence's base, ``stage_done.json``), ``sequence_report.{json,md,png}``, ``sequence.json``.
An interrupted sequence resumes where it stopped when the same command is run again: finished
stages are kept (their ``stage_done.json``), the stage in progress continues from its latest
checkpoint (Ctrl-C writes one; ``save_steps`` writes them periodically).

Exit codes: 0 done and the gate passed (or no gate); 1 the gate failed or training diverged;
2 bad config or data; 130 interrupted.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trainer.config import SELF_REPLAY, ConfigError, TrainConfig, build_config, load_yaml
from trainer.data import DataError, file_row_format, read_jsonl
from trainer.replay_buffer import replay_rows, stage_buffer, stage_shares, write_jsonl_atomic

DEFAULT_OUTPUT = "runs/sequence"
LORA_BETWEEN = ("continue", "merge")
SEQUENCE_KEYS = ("stages", "lora_between", "replay_buffer", "replay_buffer_share", "task_max_drop")
# Keys the sequence sets for every stage itself: a config that sets them would be overwritten.
MANAGED_KEYS = ("resume_from_checkpoint", "init_adapter", "previous_fisher", "fisher_path")
# Keys that must be the same in every stage (the matrix compares like with like).
SHARED_ONLY = ("model", "method", "demo_base", "tokenizer", "capability_suite", "output_dir", "seed", "device")
STAGE_REQUIRED = ("data", "capability_task")


class SequenceError(ConfigError):
    """A problem with the sequence config (exit 2)."""


@dataclass
class SequenceSpec:
    """The parsed sequence: shared trainer values, the stages, the sequence's own keys."""

    shared: dict[str, Any]
    stages: list[dict[str, Any]]
    cli: dict[str, str]
    lora_between: str = "continue"
    replay_buffer: int = 0
    replay_buffer_share: float = 0.5
    task_max_drop: float | None = None
    source: str = "config"

    def fingerprint(self) -> str:
        """What identifies this sequence in its output folder (a resume must run the same one)."""
        blob = json.dumps({"shared": self.shared, "stages": self.stages, "cli": self.cli,
                           "keys": [self.lora_between, self.replay_buffer, self.replay_buffer_share,
                                    self.task_max_drop]}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Stage:
    index: int  # 0-based
    name: str
    cfg: TrainConfig  # resolved data paths; model / Fisher / adapter / replay wired in at run time
    replay_ratio: float  # the stage's replay share (of the buffer, and of general rows when given)
    general_replay: bool  # replay_data (general rows) given besides the buffer
    explicit: frozenset = frozenset()  # the keys the config file or command line set for this stage

    @property
    def dir(self) -> Path:
        return Path(self.cfg.output_dir)


# ------------------------------------------------------------------------ the config


def _number(key: str, value: Any, kind: type, source: str):
    try:
        if isinstance(value, bool):
            raise ValueError
        return kind(float(value)) if kind is int and isinstance(value, str) else kind(value)
    except (TypeError, ValueError):
        raise SequenceError(f"{source}: {key}={value!r}: expected {kind.__name__}") from None


def parse_spec(argv: list[str]) -> SequenceSpec:
    """``--config FILE.yaml [key=value ...]`` -> SequenceSpec; SequenceError names what is wrong."""
    from trainer.config import field_types, split_command_line

    configs, cli = split_command_line(argv)
    if len(configs) > 1:
        raise SequenceError("give one --config FILE.yaml (the sequence's stages live in it)")
    config_path = configs[0] if configs else None
    if config_path is None:
        raise SequenceError("a sequence needs --config FILE.yaml with a `stages:` list")
    values = load_yaml(config_path)
    source = str(config_path)
    trainer_keys = set(field_types())
    for key in list(values) + list(cli):
        if key not in trainer_keys and key not in SEQUENCE_KEYS:
            build_config({key: None}, source=source if key in values else "command line")  # the trainer's message
    if "stages" in cli:
        raise SequenceError("stages: set them in the config file, not on the command line")
    merged = {**values, **cli}
    stages = values.get("stages")
    if not isinstance(stages, list) or not stages:
        raise SequenceError(f"{source}: `stages:` must be a non-empty list of stages "
                            "(each a mapping with name, data and capability_task)")
    spec = SequenceSpec(shared={k: v for k, v in values.items() if k not in SEQUENCE_KEYS},
                        stages=[], cli={k: v for k, v in cli.items() if k not in SEQUENCE_KEYS}, source=source)
    spec.lora_between = str(merged.get("lora_between", "continue"))
    if spec.lora_between not in LORA_BETWEEN:
        raise SequenceError(f"{source}: lora_between={spec.lora_between!r}: must be one of {', '.join(LORA_BETWEEN)}")
    spec.replay_buffer = _number("replay_buffer", merged.get("replay_buffer", 0), int, source)
    spec.replay_buffer_share = _number("replay_buffer_share", merged.get("replay_buffer_share", 0.5), float, source)
    if spec.replay_buffer < 0:
        raise SequenceError(f"{source}: replay_buffer={spec.replay_buffer}: must be >= 0 (0 = off)")
    if not 0 < spec.replay_buffer_share <= 1:
        raise SequenceError(f"{source}: replay_buffer_share={spec.replay_buffer_share}: must be in (0, 1]")
    if merged.get("task_max_drop") not in (None, "none", "null"):
        spec.task_max_drop = _number("task_max_drop", merged["task_max_drop"], float, source)
        if spec.task_max_drop < 0:
            raise SequenceError(f"{source}: task_max_drop={spec.task_max_drop}: must be >= 0 points")
    names = set()
    for i, stage in enumerate(stages):
        where = f"{source}: stages[{i}]"
        if not isinstance(stage, dict):
            raise SequenceError(f"{where}: expected a mapping (name, data, capability_task, overrides)")
        name = stage.get("name")
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise SequenceError(f"{where}: needs a `name:` of letters, digits, - and _ (it names the stage's folder)")
        if name in names:
            raise SequenceError(f"{where}: duplicate stage name {name!r}")
        names.add(name)
        for key in stage:
            if key != "name" and key not in trainer_keys:
                build_config({key: None}, source=f"{where} ({name})")
        missing = [k for k in STAGE_REQUIRED if not stage.get(k)]
        if missing:
            raise SequenceError(f"{where} ({name}): missing {', '.join(missing)} (data = the stage's training "
                                "rows, capability_task = its held-out task suite, scored after every stage)")
        fixed = [k for k in SHARED_ONLY if k in stage]
        if fixed:
            raise SequenceError(f"{where} ({name}): {', '.join(fixed)} cannot differ between stages; set "
                                f"{'it' if len(fixed) == 1 else 'them'} once, outside `stages:`")
        spec.stages.append(dict(stage))
    managed = sorted(k for k in MANAGED_KEYS if any(k in d for d in (values, cli, *stages)))
    if managed:
        raise SequenceError(f"{', '.join(managed)}: set by the sequence for every stage (resume: rerun the same "
                            "command; the previous stage's weights, adapter and Fisher are carried over)")
    return spec


def stage_configs(spec: SequenceSpec) -> list[Stage]:
    """Every stage's TrainConfig, checked like ``trainer.run`` checks one (keys, values, demo files,
    data files, suites); no model is built or loaded here."""
    from trainer.demo.sequence_tasks import TaskNameError, resolve_task_names
    from trainer.preflight import check_inputs
    from trainer.run import (
        demo_defaults_for,
        expand_home,
        model_is_a_path,
        resolve_chat_tasks,
        resolve_demo_data,
    )

    out_root = Path(str({**spec.shared, **spec.cli}.get("output_dir") or DEFAULT_OUTPUT))
    stages = []
    for i, raw in enumerate(spec.stages):
        values = {**spec.shared, **{k: v for k, v in raw.items() if k != "name"}, **spec.cli}
        values["output_dir"] = str(out_root / f"stage-{i + 1}-{raw['name']}")
        where = f"stage {i + 1} ({raw['name']})"
        ratio = _number("replay_ratio", values.get("replay_ratio", 0.0), float, where)
        general = bool(values.get("replay_data")) and str(values.get("replay_data")).lower() not in ("none", "null")
        if spec.replay_buffer and not 0 < ratio < 1:
            raise SequenceError(f"{where}: replay_buffer={spec.replay_buffer} needs replay_ratio in (0, 1): the "
                                "share of every batch replayed (the buffer's rows, and general rows if replay_data)")
        if spec.replay_buffer and not general:
            # Only the buffer is replayed; stage 1 has none yet. Both keys count as given, so the
            # demo's defaults (20% of its general corpus) do not fill them in.
            values.update(replay_ratio=0.0, replay_data=None)
        try:
            values = resolve_task_names(values)
        except TaskNameError as e:
            raise SequenceError(f"{where}: {e}") from None
        cfg = build_config(values, source=where)
        explicit = set(values)
        cfg = replace(cfg, **demo_defaults_for(cfg, explicit))
        cfg = resolve_chat_tasks(resolve_demo_data(expand_home(cfg)))
        if cfg.interpolate != "none":
            raise SequenceError(f"{where}: interpolate={cfg.interpolate} is not available in a sequence")
        if cfg.method == "lora_ewc" and spec.lora_between == "continue" and len(spec.stages) > 1:
            raise SequenceError("method=lora_ewc needs lora_between=merge: its penalty holds s*B*A near zero, i.e. "
                                "the weights near the model the adapter was added to, which with continue would "
                                "stay the first stage's start instead of the previous stage's end")
        check_inputs(cfg, model_is_local=i == 0 and model_is_a_path(cfg.model))
        stages.append(Stage(i, raw["name"], cfg, ratio, general, frozenset(explicit)))
    if spec.replay_buffer:
        # The buffer (and its general rows) is one replay file, and the trainer reads one row format per file.
        files = [s.cfg.data for s in stages] + [s.cfg.replay_data for s in stages
                                                 if s.general_replay and s.cfg.replay_data != SELF_REPLAY]
        formats = {path: file_row_format(path) for path in dict.fromkeys(files)}
        if any(s.general_replay and s.cfg.replay_data == SELF_REPLAY for s in stages):
            formats[f"replay_data={SELF_REPLAY}"] = "messages"  # the model's own answers are chats
        if len(set(formats.values())) > 1:
            raise SequenceError("replay_buffer: the stages' data (and replay_data) must share one row format, since "
                                "their rows are replayed from one file; found "
                                + ", ".join(f"{p} ({f})" for p, f in formats.items()))
    return stages


# ------------------------------------------------------------------------ state on disk


def _write_json(path: Path, data: dict) -> None:
    """Atomic: a reader (or a resume) sees the old file or the new one, never half of one."""
    from trainer.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def claim_output_dir(out: Path, spec: SequenceSpec) -> bool:
    """``sequence.json`` names the sequence the folder holds; True when it is resumed."""
    marker = out / "sequence.json"
    held = _read_json(marker)
    if held is not None and held.get("fingerprint") != spec.fingerprint():
        raise SequenceError(f"output_dir={out} holds another sequence (its sequence.json, from {held.get('source')}); "
                            "choose another output_dir, or delete that folder to start over")
    _write_json(marker, {"fingerprint": spec.fingerprint(), "source": spec.source, "shared": spec.shared,
                         "stages": spec.stages, "cli": spec.cli, "lora_between": spec.lora_between,
                         "replay_buffer": spec.replay_buffer, "replay_buffer_share": spec.replay_buffer_share,
                         "task_max_drop": spec.task_max_drop})
    return held is not None


# ------------------------------------------------------------------------ one stage


def wire_stage(spec: SequenceSpec, stages: list[Stage], k: int, done: list[dict], base_model: str,
               out: Path) -> tuple[TrainConfig, dict]:
    """Stage k's config with what the earlier stages left: the start weights (or adapter), the
    online Fisher, the replay buffer. Returns it and a note of what was wired (for the report)."""
    stage = stages[k]
    cfg = replace(stage.cfg, model=base_model)
    wired: dict[str, Any] = {"start": base_model}
    if k > 0:
        prev = done[k - 1]
        lora = cfg.method in ("lora", "lora_ewc")
        if not lora:
            cfg = replace(cfg, model=prev["saved_to"])
        elif spec.lora_between == "continue":
            cfg = replace(cfg, init_adapter=prev["saved_to"])
        else:
            cfg = replace(cfg, model=prev["merged"])
        wired["start"] = cfg.init_adapter or cfg.model
        if cfg.method in ("ewc", "lora_ewc"):
            # F_k = gamma F_{k-1} + F(task k-1 at the weights that ended stage k-1): the trainer
            # estimates the new term on fisher_data at the model it loads, and anchors there.
            cfg = replace(cfg, previous_fisher=prev["fisher_file"], fisher_data=stages[k - 1].cfg.data)
            wired["fisher"] = {"previous": prev["fisher_file"], "new_on": stages[k - 1].cfg.data,
                               "gamma": cfg.ewc_online_gamma}
    if spec.replay_buffer and k > 0:
        earlier = [read_jsonl(s.cfg.data) for s in stages[:k]]
        buffer = stage_buffer(earlier, spec.replay_buffer, cfg.seed)
        general = None
        if stage.general_replay:
            general = read_jsonl(self_replay_file(cfg) if cfg.replay_data == SELF_REPLAY else cfg.replay_data)
        rows = replay_rows(buffer, general, spec.replay_buffer_share, cfg.seed)
        path = write_jsonl_atomic(out / "replay" / f"stage-{k + 1}.jsonl", rows)
        cfg = replace(cfg, replay_data=str(path), replay_ratio=stage.replay_ratio)
        wired["replay_buffer"] = {"file": str(path), "buffer_rows": len(buffer), "general_rows": len(rows) - len(buffer),
                                  "stage_shares": stage_shares(buffer, k), "replay_ratio": stage.replay_ratio}
    return cfg, wired


def self_replay_file(cfg: TrainConfig) -> str:
    """replay_data=self beside a replay buffer: the stage's start model (its ``model``, plus
    ``init_adapter`` when it continues an adapter) answers the prompt bank here (or the cache
    has the answers), so its rows can join the buffer's in one replay file."""
    from trainer.self_replay import self_replay_from_config

    if cfg.init_adapter:
        model, tokenizer = load_for_scoring(replace(cfg, init_adapter=None), cfg.init_adapter)
    else:
        model, tokenizer = load_for_scoring(cfg, cfg.model)
    path, _ = self_replay_from_config(cfg, model, tokenizer)  # it logs its own summary and path
    del model
    return str(path)


def _device(cfg: TrainConfig):
    """Where scoring runs: the trainer's device key (auto = CUDA when there is one)."""
    import torch

    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_scoring(cfg: TrainConfig, saved_to: str):
    """The model a stage ended with: its saved model, or its start model plus its adapter."""
    from trainer.loop import load_model

    adapter = (Path(saved_to) / "adapter_config.json").is_file()
    model, tokenizer = load_model(cfg if adapter else replace(cfg, model=saved_to, init_adapter=None), _device(cfg))
    if adapter:
        from kernels.peft_format import load_adapter

        load_adapter(model, saved_to)
    model.eval()
    return model, tokenizer


def merge_into_model(model, tokenizer, out_dir: Path) -> Path:
    """lora_between=merge: the adapter folded into its base, saved where the next stage starts
    (built beside its final place and renamed into it)."""
    import shutil

    from kernels.lora_layers import merge_lora
    from trainer.checkpoint import follow_umask

    final = out_dir / "merged"
    tmp = out_dir / ".merged-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merge_lora(model).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    follow_umask(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def score_stage(cfg: TrainConfig, stages: list[Stage], k: int, saved_to: str, base_reports: list,
                merge: bool) -> dict:
    """Stage k's row of R and its capability scores. The stage's own report (capability suite +
    its task suite, against the sequence's base) is written to its folder, as ``trainer.run``
    writes one; the other stages' task suites are scored on their own."""
    import eval as ev

    started = time.time()
    model, tokenizer = load_for_scoring(cfg, saved_to)
    kwargs = dict(progress=cfg.progress, limit=cfg.capability_limit)
    own_suite = stages[k].cfg.capability_task
    row: list[float] = []
    capabilities: dict[str, float] = {}
    report_path = None
    if cfg.capability_suite:
        report = ev.score_model(model, tokenizer, cfg.capability_suite, task=own_suite, run_name=stages[k].name,
                                model_path=cfg.model, adapter_path=saved_to, **kwargs)
        report.forgetting = ev.compare_reports(base_reports[k], report, cfg.capability_max_drop,
                                               cfg.capability_max_format_rigidity, gate=cfg.capability_gate)
        report_path = ev.write_report(report, stages[k].dir / "forgetting_report.json")["json"]
        capabilities = {c: s.accuracy for c, s in report.categories.items()}
        own_score = report.task.accuracy
    for j, other in enumerate(stages):
        if j == k and cfg.capability_suite:
            row.append(own_score)
            continue
        row.append(ev.score_model(model, tokenizer, other.cfg.capability_task, run_name=f"{stages[k].name} on {other.name}",
                                  **kwargs).overall_accuracy)
    merged = str(merge_into_model(model, tokenizer, stages[k].dir)) if merge else None
    return {"R_row": row, "capabilities": capabilities, "forgetting_report": str(report_path) if report_path else None,
            "capability_mean_drop": (report.forgetting.mean_forgetting if cfg.capability_suite else None),
            "capability_failed": (list(report.forgetting.failed_categories)
                                  + (["format rigidity"] if report.forgetting.format_rigidity_failed else [])
                                  if cfg.capability_suite else []),
            "merged": merged, "score_seconds": time.time() - started}


def score_base(cfg: TrainConfig, stages: list[Stage]) -> tuple[list, list[float]]:
    """The base (the first stage's start) on the capability suite with each task suite, and its
    score on every task suite (``b`` of FWT); both through eval's score cache."""
    import eval as ev
    from trainer.loop import load_model

    model, tokenizer = load_model(cfg, _device(cfg))
    model.eval()
    kwargs = dict(progress=cfg.progress, limit=cfg.capability_limit, cache=True, model_path=cfg.model)
    reports, b = [], []
    for s in stages:
        if cfg.capability_suite:
            report = ev.score_model(model, tokenizer, cfg.capability_suite, task=s.cfg.capability_task,
                                    run_name="base", **kwargs)
            reports.append(report)
            b.append(report.task.accuracy)
        else:
            b.append(ev.score_model(model, tokenizer, s.cfg.capability_task, run_name="base", **kwargs).overall_accuracy)
    return reports, b


def run_stage(spec: SequenceSpec, stages: list[Stage], k: int, done: list[dict], base_model: str, out: Path,
              base_reports: list, on_step_end=None) -> dict:
    """Train stage k (or resume it, or keep it when it finished), score it, and mark it done."""
    from trainer import checkpoint as ckpt
    from trainer.loop import train

    stage = stages[k]
    cfg, wired = wire_stage(spec, stages, k, done, base_model, out)
    trained = _read_json(stage.dir / "trained.json")
    if trained is None:
        resume = "latest" if ckpt.list_checkpoints(stage.dir) else None
        print(f"stage {k + 1}/{len(stages)} {stage.name}: start ({cfg.method}, "
              f"{'resuming from ' + str(ckpt.list_checkpoints(stage.dir)[-1]) if resume else 'from ' + wired['start']}"
              f"{', replay buffer ' + str(wired['replay_buffer']['buffer_rows']) + ' rows' if 'replay_buffer' in wired else ''})",
              flush=True)
        hook = (lambda step, record: on_step_end(k, step, record)) if on_step_end else None
        result = train(replace(cfg, resume_from_checkpoint=resume), on_step_end=hook)
        print(result.summary(), flush=True)
        trained = {"saved_to": str(result.saved_to), "steps": max(result.losses) if result.losses else result.steps,
                   "train_seconds": result.wall_seconds, "tokens_per_second": result.tokens_per_second,
                   "fisher_file": str(result.fisher_file) if result.fisher_file else None,
                   "stopped_early": result.stopped_early, "wired": wired}
        _write_json(stage.dir / "trained.json", trained)
    merge = cfg.method in ("lora", "lora_ewc") and spec.lora_between == "merge"
    scores = score_stage(cfg, stages, k, trained["saved_to"], base_reports, merge)
    record = {**trained, **scores, "name": stage.name, "model": cfg.model, "init_adapter": cfg.init_adapter}
    _write_json(stage.dir / "stage_done.json", record)
    return record


# ------------------------------------------------------------------------ the sequence


def with_chat_default(spec: SequenceSpec, stages: list[Stage], model: str) -> list[Stage]:
    """What ``trainer.run`` does for one run, per stage: a chat model tuned on chat rows with nothing
    said about replay (no ``replay_buffer``, and no ``replay_data``, ``replay_ratio`` or ``kl_to_base``
    in the config or on the command line) replays its own answers (``trainer.run.CHAT_RECIPE``; a
    later stage's are the answers of the model it starts from). ``replay_ratio=0`` turns it off.
    ``model`` is the resolved base: its tokenizer says whether there is a chat template."""
    if spec.replay_buffer:
        return stages
    from trainer.run import default_chat_recipe

    out = []
    for stage in stages:
        cfg, sources = default_chat_recipe(replace(stage.cfg, model=model), {k: "you" for k in stage.explicit})
        if sources.get("replay_data") == "chat default":
            stage = replace(stage, cfg=replace(cfg, model=stage.cfg.model), replay_ratio=cfg.replay_ratio)
        out.append(stage)
    return out


def stage_line(k: int, stages: list[Stage], record: dict) -> str:
    tasks = " | ".join(f"{s.name} {v:.1f}" for s, v in zip(stages, record["R_row"], strict=True))
    caps = ""
    if record.get("capabilities"):
        mean = sum(record["capabilities"].values()) / len(record["capabilities"])
        caps = f"; capabilities mean {mean:.1f} (drop {record['capability_mean_drop']:+.1f})"
    seconds = record.get("train_seconds", 0.0) + record.get("score_seconds", 0.0)
    return f"stage {k + 1}/{len(stages)} {stages[k].name}: done in {seconds:.0f} s; tasks {tasks}{caps}"


def run_sequence(spec: SequenceSpec, stages: list[Stage], on_step_end=None) -> dict:
    """Every stage in order (finished ones kept), then the report; returns the report dict."""
    from trainer.run import resolve_model, use_one_thread_for_small_models
    from trainer.sequence_report import build_report, write_sequence_report

    started = time.time()
    if not stages[0].cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bars too
    out = Path(stages[0].cfg.output_dir).parent
    out.mkdir(parents=True, exist_ok=True)
    resumed = claim_output_dir(out, spec)
    base_cfg = resolve_model(stages[0].cfg)  # the demo base is pretrained here on first use (minutes, once)
    use_one_thread_for_small_models(Path(base_cfg.model), base_cfg.device)
    if resumed:
        print(f"sequence: resuming in {out} (finished stages are kept)", flush=True)
    print(f"sequence: {len(stages)} stages ({', '.join(s.name for s in stages)}), method {base_cfg.method}, "
          f"base {base_cfg.model}; scoring the base ...", flush=True)
    stages = with_chat_default(spec, stages, base_cfg.model)
    base_reports, b = score_base(base_cfg, stages)
    done: list[dict] = []
    for k, stage in enumerate(stages):
        record = _read_json(stage.dir / "stage_done.json")
        if record is None:
            record = run_stage(spec, stages, k, done, base_cfg.model, out, base_reports, on_step_end)
        else:
            print(f"stage {k + 1}/{len(stages)} {stage.name}: finished before, kept", flush=True)
        done.append(record)
        print(stage_line(k, stages, record), flush=True)
    report = build_report(spec, stages, done, base_reports, b, wall_seconds=time.time() - started)
    write_sequence_report(report, out)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from trainer.loop import TrainingDiverged
    from trainer.sequence_report import summary_text

    try:
        spec = parse_spec(argv)
        report = run_sequence(spec, stage_configs(spec))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume (finished stages are kept, the stage in "
              "progress continues from its latest checkpoint)", file=sys.stderr)
        return 130
    print(summary_text(report), flush=True)
    return 0 if report["gate"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
