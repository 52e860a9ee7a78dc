"""The one training config: a dataclass with Hugging Face names, its help text beside each field.

``python -m trainer.run [--config FILE.yaml] [key=value ...]``: the YAML file is read first,
then the ``key=value`` overrides, each checked against the fields here. An unknown key is an
error naming the closest valid ones; a value of the wrong type is an error naming the key, the
value and the type wanted. ``--help`` prints every field with its default and its help line.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("full", "lora", "ewc", "lora_ewc")
# What the loss is, independent of which weights move (method): plain next-token NLL (sft), DFT
# (each token's NLL weighted by its own detached probability, arXiv 2508.05629), or on-policy
# self-distillation (sdft, arXiv 2601.19897: the student samples, the demonstration-conditioned
# teacher scores, the loss is a per-token divergence over the whole vocabulary).
OBJECTIVES = ("sft", "dft", "sdft")
SDFT_TEMPLATE = ("{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
                 "Now answer with a response of your own, including the thinking process.")
CAPABILITY_GATES = ("significant", "point")
SELF_REPLAY = "self"  # replay_data=self: the base model's own answers to a prompt bank (trainer.self_replay)


class ConfigError(ValueError):
    """A config problem the user can fix (unknown key, bad value, missing file)."""


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field whose help line (and allowed values) live next to it."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- what to train ---------------------------------------------------------------------
    model: str = _f("demo", "local HF model directory (safetensors weights); 'demo' builds/loads the demo base")
    demo_base: str = _f("default", "recipe of the demo base when model=demo: default | tiny (seconds, for checks)",
                        ("default", "tiny"))
    tokenizer: str | None = _f(None, "tokenizer directory; default: the model directory")
    method: str = _f("lora", "what trains: full | lora | ewc (full + Fisher penalty) | lora_ewc", METHODS)
    trust_remote_code: bool = _f(False, "allow model code from the model directory (off unless you trust it)")
    # --- data ------------------------------------------------------------------------------
    data: str | None = _f(None, "task JSONL: rows {text} | {prompt, completion} | {messages}; 'demo' = the demo support task")
    eval_data: str | None = _f(None, "validation JSONL; default: validation_split of data")
    validation_split: float = _f(0.05, "share of data held out for validation when eval_data is not set (0 = none)")
    replay_data: str | None = _f(None, "general JSONL mixed into training (replay); 'demo' = the demo general corpus; "
                                       "'self' = the base model's own answers to a prompt bank (see self_replay_*)")
    replay_ratio: float = _f(0.0, "share of training examples drawn from replay_data (0 = no replay)")
    max_length: int = _f(256, "tokens per example; longer rows are truncated (and counted in the log)")
    packing: str = _f("auto", "padding-free batches (rows end to end, position ids restarting per row): auto (where "
                      "trainer.packing verified the model) | true | false", ("auto", "true", "false"))
    group_by_length: bool = _f(False, "padded batches: sort each global batch's rows by length before the micro-batches "
                               "(less padding; packing=auto turns it on where it cannot pack)")
    # --- batch and schedule ----------------------------------------------------------------
    output_dir: str = _f("runs/latest", "where the model/adapter, checkpoints, metrics and reports go")
    seed: int = _f(0, "seed for init, data order, replay mixing and dropout")
    per_device_train_batch_size: int = _f(16, "examples per micro-batch on each process")
    per_device_eval_batch_size: int = _f(32, "examples per validation batch on each process")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    num_train_epochs: float = _f(1.0, "passes over the task data (ignored when max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps; > 0 overrides num_train_epochs")
    learning_rate: float = _f(1e-3, "peak AdamW learning rate")
    lr_scheduler_type: str = _f("cosine", "decay after warmup: linear | cosine | constant", ("linear", "cosine", "constant"))
    warmup_steps: int = _f(0, "linear warmup steps from 0 to learning_rate")
    warmup_ratio: float = _f(0.0, "warmup as a share of all steps (used when warmup_steps = 0)")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (not applied to biases and norms)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0 = no clipping)")
    # --- LoRA ------------------------------------------------------------------------------
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA alpha; scale = alpha / r (alpha / sqrt(r) with use_rslora)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    lora_targets: list[str] = _f(["all-linear"], "module names to adapt (e.g. q_proj,v_proj) or all-linear")
    use_rslora: bool = _f(False, "rank-stabilised LoRA scale alpha / sqrt(r)")
    init_adapter: str | None = _f(None, "LoRA: start from this PEFT adapter directory (its r, alpha and targets) "
                                        "instead of a fresh adapter, e.g. the previous stage's of a task sequence")
    # --- EWC -------------------------------------------------------------------------------
    ewc_lambda: float = _f(1.0, "EWC strength: penalty lambda/2 * sum F (w - w*)^2")
    fisher_data: str | None = _f(None, "general JSONL for the Fisher; default: replay_data")
    fisher_samples: int = _f(256, "examples used to estimate the Fisher")
    fisher_kind: str = _f("empirical", "empirical (observed labels) | mc (labels sampled from the model)", ("empirical", "mc"))
    fisher_path: str | None = _f(None, "reuse this Fisher file (safetensors) instead of estimating one")
    previous_fisher: str | None = _f(None, "online EWC: earlier Fisher file merged as gamma*F_old + F_new")
    ewc_online_gamma: float = _f(1.0, "online EWC decay of previous_fisher")
    # --- objective (what the loss is) ---------------------------------------------------------
    objective: str = _f("sft", "sft (next-token NLL) | dft (NLL weighted by the token's own detached probability; "
                        "ASFT = dft with kl_to_base) | sdft (on-policy self-distillation, see trainer/sdft.py)",
                        OBJECTIVES)
    sdft_template: str = _f(SDFT_TEMPLATE, "sdft: the teacher's user turn; must hold {prompt} and {demonstration}")
    sdft_teacher: str = _f("base", "sdft: base (LoRA: adapters off; full: a frozen copy) | ema (an EMA of the student)",
                           ("base", "ema"))
    sdft_ema_rate: float = _f(0.01, "sdft_teacher=ema: teacher <- (1 - rate) teacher + rate student, each step")
    sdft_divergence: str = _f("forward", "sdft: forward = KL(teacher || student) | reverse = KL(student || teacher) | "
                              "jsd (sdft_jsd_beta)", ("forward", "reverse", "jsd"))
    sdft_jsd_beta: float = _f(0.5, "sdft_divergence=jsd: mixture weight beta in M = beta P_teacher + (1 - beta) P_student")
    sdft_temperature: float = _f(1.0, "sdft: sampling temperature of the student's rollouts")
    sdft_top_p: float = _f(1.0, "sdft: nucleus mass of the student's rollouts (1 = the whole vocabulary)")
    sdft_max_new_tokens: int = _f(64, "sdft: tokens sampled per rollout at most (a rollout stops at end of turn)")
    sdft_num_generations: int = _f(1, "sdft: rollouts sampled per prompt each step")
    sdft_skip_tokens: int = _f(3, "sdft: the first N sampled tokens of each rollout carry no loss (reference code: 3)")
    # --- self-replay (replay_data=self) ----------------------------------------------------
    self_replay_prompts: str | None = _f(None, "your own prompts, JSONL rows {\"prompt\": ...}, added to the built-in bank")
    self_replay_samples: int = _f(256, "prompts drawn (seeded by seed) from the bank for the base to answer (0 = all)")
    self_replay_max_new_tokens: int = _f(128, "answer budget in tokens; answers stop at end of turn")
    self_replay_do_sample: bool = _f(False, "sample the answers (temperature, top_p) instead of greedy decoding")
    self_replay_temperature: float = _f(0.7, "sampling temperature (with self_replay_do_sample=true)")
    self_replay_top_p: float = _f(0.9, "nucleus sampling mass (with self_replay_do_sample=true)")
    # --- KL to the base (data-free protection) ------------------------------------------------
    kl_to_base: float = _f(0.0, "weight of a token KL between the base's and the trained model's next-token "
                                "distributions, added to the loss (0 = off); see trainer/kl_anchor.py")
    kl_on: str = _f("all", "rows the KL is taken on: task | replay | all", ("task", "replay", "all"))
    kl_kind: str = _f("forward", "forward = KL(base || tuned) | reverse = KL(tuned || base)", ("forward", "reverse"))
    kl_cache: bool = _f(False, "full fine-tuning: store the base's top-k log-probs once instead of a frozen copy")
    kl_topk: int = _f(64, "tokens per position kept by kl_cache (the rest of the mass is one bucket)")
    # --- validation, early stopping, checkpoints -------------------------------------------
    eval_steps: int = _f(0, "validation loss every N steps (0 = only at the end)")
    early_stopping_patience: int = _f(0, "stop after N evaluations without improvement, restoring the best weights (0 = off)")
    early_stopping_metric: str = _f("loss", "what early stopping watches: loss (validation loss) | task (the task's "
                                    "validation score, capability_task scored at each eval step)", ("loss", "task"))
    max_kl_to_base: float | None = _f(None, "stop when KL(base || tuned) on the task's validation prompts (logged at every "
                                            "eval step as kl_to_base_val) exceeds this many nats per token (None = off)")
    save_steps: int = _f(0, "checkpoint every N steps (0 = only on interrupt)")
    save_total_limit: int = _f(2, "keep at most N checkpoints (0 = keep all)")
    resume_from_checkpoint: str | None = _f(None, "checkpoint directory, or 'latest' in output_dir")
    # --- logging and hardware --------------------------------------------------------------
    logging_steps: int = _f(1, "write metrics.jsonl every N steps")
    report_to: str = _f("none", "none | tensorboard", ("none", "tensorboard"))
    bf16: str = _f("auto", "bf16 autocast: auto (on with CUDA bf16, or a CPU with AVX512_BF16/AMX and a model over 20M parameters) | true | false", ("auto", "true", "false"))
    fused_head: bool = _f(True, "LM head + loss without the [tokens, vocab] logits (kernels.linear_cross_entropy); "
                          "where the model's head is not a plain linear map its own logits are used (logged)")
    recompute_mlp: bool = _f(True, "gated MLPs (Llama, Qwen2, Mistral, Gemma) keep only gate(x) and up(x) for backward and "
                             "remake the rest there (kernels.gated_mlp): two fewer [tokens, intermediate] tensors a layer; "
                             "off under gradient_checkpointing")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    fsdp: bool = _f(False, "shard full fine-tuning with FSDP2 (fully_shard) under torchrun")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    progress: bool = _f(True, "show the tqdm progress bar")
    # --- end-of-run forgetting report ------------------------------------------------------
    capability_suite: str | None = _f(None, "eval suite JSONL scored on base and tuned model at the end ('demo' = demo suite)")
    capability_task: str | None = _f(None, "eval suite JSONL of the target task, for the target gain in the report")
    capability_limit: int | None = _f(None, "score only the first N rows of each suite (quick checks)")
    capability_max_drop: float | None = _f(None, "fail the run (exit 1) when a capability drops by more than N points")
    capability_gate: str = _f("significant", "significant: a category fails when its drop exceeds capability_max_drop AND "
                              "its paired 95% interval excludes 0 | point: the drop alone decides (see eval/README.md)",
                              CAPABILITY_GATES)
    interpolate: str = _f("none", "auto: after the report, mix the result back toward the base (alpha grid) and save "
                                  "the largest alpha passing capability_max_drop and capability_max_format_rigidity in "
                                  "output_dir/interpolation",
                          ("none", "auto"))
    interpolate_refine: int = _f(2, "interpolate=auto: bisection steps between the largest passing and the smallest "
                                    "failing alpha of the grid (0 = the grid only)")
    capability_max_format_rigidity: float | None = _f(
        None, "fail the run (exit 1) when the share of non-task answers in the task's format rises more than N "
              "points over the base (task format: _meta.task_format of capability_suite or capability_task)")

    def global_batch(self, world_size: int) -> int:
        """Rows per optimizer step over every process (the batch plan and the chat default both count it)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def help_text(demo_defaults: dict[str, Any] | None = None) -> str:
    """Every key with its default and help line, grouped as in the dataclass; with
    ``demo_defaults``, the value model=demo fills in beside each key it changes."""
    lines = ["usage: python -m trainer.run [--config FILE.yaml] [key=value ...]", ""]
    if demo_defaults:
        lines += ["keys (default; with model=demo, the keys you do not set take the demo's value, shown as",
                  "'demo: ...' - eval_data and capability_task only when data is the demo's too; with your",
                  "own model the plain default applies):"]
    else:
        lines.append("keys (default):")
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        line = f"  {f.name}={_shown(default)}"
        if demo_defaults and f.name in demo_defaults:
            line = f"{line:<40} demo: {_shown(demo_defaults[f.name])}"
        lines.append(line)
        lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise a ConfigError."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
    want = getattr(hint, "__name__", str(hint))
    try:
        if typing.get_origin(hint) is list:
            items = value if isinstance(value, list) else [s.strip() for s in str(value).split(",")]
            return [str(s) for s in items if str(s)]
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, bool):  # YAML reads `bf16: true` as a bool
                return "true" if value else "false"
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected {want}") from None
    raise ConfigError(f"{key}: unsupported field type {hint}")


def _unknown_key_error(key: str, source: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; run with --help for the list"
    return ConfigError(f"unknown config key {key!r} ({source}){hint}")


def build_config(values: dict[str, Any], source: str = "overrides") -> TrainConfig:
    """A TrainConfig from a mapping of raw values, every key and value checked."""
    hints = field_types()
    checked: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in hints:
            raise _unknown_key_error(key, source)
        checked[key] = _coerce(key, raw, hints[key])
    cfg = TrainConfig(**checked)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{f.name}={value!r}: must be one of {', '.join(choices)}")
    positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_length", "lora_r", "logging_steps", "kl_topk")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be >= 1")
    if cfg.interpolate_refine < 0:
        raise ConfigError(f"interpolate_refine={cfg.interpolate_refine}: must be >= 0")
    if cfg.kl_to_base < 0:
        raise ConfigError(f"kl_to_base={cfg.kl_to_base}: must be >= 0 (0 = off)")
    if not 0.0 <= cfg.replay_ratio < 1.0:
        raise ConfigError(f"replay_ratio={cfg.replay_ratio}: must be in [0, 1)")
    if not 0.0 <= cfg.validation_split < 1.0:
        raise ConfigError(f"validation_split={cfg.validation_split}: must be in [0, 1)")
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        raise ConfigError("set max_steps > 0 or num_train_epochs > 0")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"learning_rate={cfg.learning_rate}: must be > 0")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout={cfg.lora_dropout}: must be in [0, 1)")
    if cfg.replay_ratio > 0 and not cfg.replay_data:
        raise ConfigError("replay_ratio > 0 needs replay_data")
    if cfg.self_replay_samples < 0:
        raise ConfigError(f"self_replay_samples={cfg.self_replay_samples}: must be >= 0 (0 = the whole bank)")
    if cfg.self_replay_max_new_tokens < 1:
        raise ConfigError(f"self_replay_max_new_tokens={cfg.self_replay_max_new_tokens}: must be >= 1")
    if not cfg.self_replay_temperature > 0:
        raise ConfigError(f"self_replay_temperature={cfg.self_replay_temperature}: must be > 0")
    if not 0 < cfg.self_replay_top_p <= 1:
        raise ConfigError(f"self_replay_top_p={cfg.self_replay_top_p}: must be in (0, 1]")
    if cfg.objective == "sdft":
        for key in ("{prompt}", "{demonstration}"):
            if key not in cfg.sdft_template:
                raise ConfigError(f"sdft_template must hold {key} (the teacher sees the prompt and the demonstration); "
                                  f"got {cfg.sdft_template!r}")
    if not 0 < cfg.sdft_ema_rate <= 1:
        raise ConfigError(f"sdft_ema_rate={cfg.sdft_ema_rate}: must be in (0, 1]")
    if not 0 < cfg.sdft_jsd_beta < 1:
        raise ConfigError(f"sdft_jsd_beta={cfg.sdft_jsd_beta}: must be in (0, 1)")
    if not cfg.sdft_temperature > 0:
        raise ConfigError(f"sdft_temperature={cfg.sdft_temperature}: must be > 0")
    if not 0 < cfg.sdft_top_p <= 1:
        raise ConfigError(f"sdft_top_p={cfg.sdft_top_p}: must be in (0, 1]")
    for name in ("sdft_max_new_tokens", "sdft_num_generations"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be >= 1")
    if cfg.sdft_skip_tokens < 0:
        raise ConfigError(f"sdft_skip_tokens={cfg.sdft_skip_tokens}: must be >= 0")
    if cfg.max_kl_to_base is not None and not cfg.max_kl_to_base > 0:
        raise ConfigError(f"max_kl_to_base={cfg.max_kl_to_base}: must be > 0 nats per token (or none)")
    for name in ("capability_max_drop", "capability_max_format_rigidity"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise ConfigError(f"{name}={value}: must be >= 0 points")


def parse_args(argv: list[str]) -> TrainConfig:
    """``[--config FILE.yaml] [key=value ...]`` -> TrainConfig (the file first, then overrides)."""
    return parse_command_line(argv)[0]


def split_command_line(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """``[--config FILE.yaml ...] [key=value ...]`` -> (config files in order, key -> raw value);
    keys are normalised (``--max-steps=3`` -> ``max_steps``) but not checked here."""
    configs: list[str] = []
    pairs: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file")
            configs.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            configs.append(arg.split("=", 1)[1])
        elif "=" in arg:
            key, value = arg.split("=", 1)
            pairs[key.lstrip("-").replace("-", "_")] = value
        else:
            key = arg.lstrip("-").replace("-", "_")
            hint = f" (write {key}={argv[i + 1]})" if arg.startswith("--") and i + 1 < len(argv) else ""
            raise ConfigError(f"cannot read argument {arg!r}: expected key=value or --config FILE.yaml{hint}")
        i += 1
    return configs, pairs


def parse_command_line(argv: list[str]) -> tuple[TrainConfig, set[str]]:
    """Like :func:`parse_args`, plus the set of keys the user gave (file or command line)."""
    configs, overrides = split_command_line(argv)
    values: dict[str, Any] = {}
    for path in configs:
        values.update(load_yaml(path))
    hints = field_types()
    for key in overrides:
        if key not in hints:
            raise _unknown_key_error(key, "command line")
    for key in values:
        if key not in field_types():
            raise _unknown_key_error(key, "config file")
    merged = {**values, **overrides}
    return build_config(merged, source="config"), set(merged)


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def format_config(cfg: TrainConfig, sources: dict[str, str] | None = None) -> str:
    """One ``key: value`` line per field; with ``sources`` (key -> where the value came from,
    e.g. "set", "demo"), that origin in brackets after every value not a plain default."""
    sources = sources or {}
    lines = []
    for key, value in cfg.to_dict().items():
        line = f"  {key}: {_shown(value)}"
        origin = sources.get(key)
        lines.append(f"{line:<48} [{origin}]" if origin else line)
    return "\n".join(lines)
