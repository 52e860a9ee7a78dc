"""``objective=sdft``: on-policy self-distillation (Shenfeld, Damani, Hübotter, Agrawal 2026,
arXiv 2601.19897, "Self-Distillation Enables Continual Learning").

Each optimizer step, for every task row of the step's batch:

1. **rollout**: the current model (the student) samples ``sdft_num_generations`` answers to the
   row's prompt, rendered with the chat template, through the project's one sampler
   (``eval.generate.generate_ids``), seeded by (seed, step, rank) so a resumed run samples
   exactly what the straight run sampled;
2. the **teacher** reads the same sampled tokens after a different prompt: ``sdft_template``
   filled with the prompt and the row's demonstration (its last assistant turn, its
   completion, or TRL's ``privileged_context``), as the user turn;
3. the **loss** is the per-token divergence between the teacher's and the student's
   next-token distributions over the whole vocabulary at every sampled position after the
   first ``sdft_skip_tokens``, through the chunked ``kernels.linear_cross_entropy.linear_kl_divergence``
   (no ``[tokens, vocab]`` tensor), summed; the loop divides by the step's loss-token count
   (sampled positions + replay rows' labels), as it does for the SFT loss.

Why it keeps the model: the student learns from its own samples, scored by itself shown the
demonstration, so the targets stay close to what it already says (the paper: new skills at the
base's prior-ability average on Qwen2.5-7B, where SFT drops 9.5 points).

The teacher: ``base`` is the model before training (LoRA: the same model with its adapters
switched off, no second copy; full fine-tuning: a frozen copy), ``ema`` an exponential moving
average of the student, updated after every optimizer step (LoRA: a second set of LoRA
factors swapped in for the teacher's forward; full: a frozen copy moved toward the student).

Replay rows (and any row that is not a task row) keep the plain loss in the same step. The
loop sees an objective as three hooks (:class:`Objective`): ``rollout`` turns the step's
micro-batches into :class:`LossPart` s, ``after_step`` runs after the optimizer, and
``state_dict`` / ``load_state_dict`` carry the EMA teacher across a checkpoint.
"""
from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from trainer.config import ConfigError, TrainConfig
from trainer.data import IGNORE_INDEX, TASK, Example, encode_row, privileged_messages
from trainer.kl_anchor import eval_mode
from trainer.loss import final_hidden, to_device
from trainer.packing import build_batch

Key = tuple[int, int]  # (source, row index) of a planned row
Forward = Callable[[nn.Module, dict, Callable], tuple[torch.Tensor, torch.Tensor | None, nn.Linear | None]]


@dataclass
class LossPart:
    """One forward and backward of a step: the rows it holds as (source, index) in batch order,
    its batch, and how the batch's loss *sum* is computed (``(loss sum, hidden, head)``, as
    ``trainer.loss.Head.forward``; the hidden states feed the KL anchor)."""

    rows: list[Key]
    batch: dict
    forward: Forward


class Objective(Protocol):
    """What the loop asks of an objective that is not the plain loss (see the module docstring)."""

    def rollout(self, model: nn.Module, step: int, rank: int, micros: list[list[Key]],
                plain: Callable[[list[Key]], LossPart], autocast: Callable) -> list[list[LossPart]]: ...

    def after_step(self, model: nn.Module) -> None: ...

    def step_metrics(self) -> dict: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


# ----------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class SDFTPrompt:
    """A task row as SDFT reads it: the student's and the teacher's prompt ids (each ends where
    the answer starts), and the prompt's text for the log."""

    student_ids: list[int]
    teacher_ids: list[int]
    text: str


def demonstration_of(row: dict) -> tuple[list[dict] | str, str]:
    """(the conversation before the demonstration, or a raw prompt string; the demonstration)
    of one row: a chat's last assistant turn, a completion, or TRL's ``privileged_context``."""
    if row.get("messages"):
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return [dict(role=m["role"], content=m["content"]) for m in messages[:last]], messages[last]["content"]
    if row.get("privileged_context") is not None:
        *conversation, demonstration = privileged_messages(row)
        return conversation, demonstration["content"]
    if row.get("prompt") is not None:
        return row["prompt"], row["completion"]
    raise ConfigError("objective=sdft needs a demonstration in each task row; {\"text\"} rows have none: write "
                      "{\"messages\": [..., {\"role\": \"assistant\", ...}]}, {\"prompt\", \"completion\"} or TRL's "
                      "{\"prompt\", \"privileged_context\"} rows, or use objective=sft")


def fill_template(template: str, prompt: str, demonstration: str) -> str:
    """``template`` with ``{prompt}`` and ``{demonstration}`` filled in one pass (other braces
    stay as written, and a prompt that holds the text ``{demonstration}`` is left alone)."""
    values = {"prompt": prompt, "demonstration": demonstration}
    return re.sub(r"\{(prompt|demonstration)\}", lambda m: values[m.group(1)], template)


def teacher_conversation(conversation: list[dict], demonstration: str, template: str) -> list[dict]:
    """The conversation with its last user turn rewritten through the template (a user turn is
    appended when there is none)."""
    users = [i for i, m in enumerate(conversation) if m["role"] == "user"]
    if not users:
        return [*conversation, {"role": "user", "content": fill_template(template, "", demonstration)}]
    out = [dict(m) for m in conversation]
    out[users[-1]]["content"] = fill_template(template, out[users[-1]]["content"], demonstration)
    return out


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_ids(tokenizer, conversation: list[dict] | str) -> list[int]:
    """Prompt ids up to where the answer starts: the chat template with its generation prompt,
    or a raw prompt tokenized as ``trainer.data`` tokenizes a prompt/completion row's prompt."""
    if isinstance(conversation, str):
        return list(tokenizer(conversation, add_special_tokens=True)["input_ids"])
    return list(tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                              return_dict=False))


def sdft_prompt(tokenizer, row: dict, template: str, max_prompt_tokens: int) -> SDFTPrompt:
    conversation, demonstration = demonstration_of(row)
    if isinstance(conversation, str) and has_chat_template(tokenizer):
        conversation = [{"role": "user", "content": conversation}]  # a chat model answers a user turn
    if isinstance(conversation, list) and not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(f"objective=sdft on chat rows needs the tokenizer's chat template (the prompt the student "
                          f"answers and the teacher's context are chat turns); the tokenizer ({name}) has none: give "
                          "tokenizer=DIR with one (tokenizer_config.json \"chat_template\" or chat_template.jinja), "
                          "or write {\"prompt\", \"completion\"} rows")
    if isinstance(conversation, str):
        teacher: list[dict] | str = fill_template(template, conversation, demonstration)
        text = conversation
    else:
        teacher = teacher_conversation(conversation, demonstration, template)
        text = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
    student_ids = render_ids(tokenizer, conversation)[-max_prompt_tokens:]
    return SDFTPrompt(student_ids, render_ids(tokenizer, teacher), text)


# ------------------------------------------------------------------------------ teachers


class Teacher(Protocol):
    def hidden(self, batch: dict, autocast: Callable) -> tuple[torch.Tensor, nn.Linear]: ...

    def after_step(self, student: nn.Module) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class AdaptersOffTeacher:
    """LoRA, ``sdft_teacher=base``: the student with its adapters switched off."""

    model: nn.Module

    def hidden(self, batch: dict, autocast: Callable) -> tuple[torch.Tensor, nn.Linear]:
        from kernels.lora_layers import lora_disabled

        with lora_disabled(self.model), eval_mode(self.model), autocast():
            return final_hidden(self.model, batch)

    def after_step(self, student: nn.Module) -> None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None


@dataclass
class LoRAEMATeacher:
    """LoRA, ``sdft_teacher=ema``: a second set of LoRA factors, ``e <- (1 - rate) e + rate p``
    after each step, copied into the adapters for the teacher's forward only."""

    model: nn.Module
    rate: float
    ema: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ema = {name: p.detach().clone() for name, p in self._factors(self.model)}

    @staticmethod
    def _factors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        from kernels.lora_layers import lora_modules

        return [(f"{path}.{part}", getattr(layer, part)) for path, layer in lora_modules(model)
                for part in ("lora_A", "lora_B")]

    @torch.no_grad()
    def hidden(self, batch: dict, autocast: Callable) -> tuple[torch.Tensor, nn.Linear]:
        factors = self._factors(self.model)
        student = [p.detach().clone() for _, p in factors]
        for name, p in factors:
            p.copy_(self.ema[name])
        try:
            with eval_mode(self.model), autocast():
                return final_hidden(self.model, batch)
        finally:
            for (_, p), saved in zip(factors, student, strict=True):
                p.copy_(saved)

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        for name, p in self._factors(student):
            self.ema[name].lerp_(p.detach(), self.rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{k}": v for k, v in self.ema.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in self.ema.items():
            value.copy_(state[f"ema.{name}"])


@dataclass
class FrozenCopyTeacher:
    """Full fine-tuning: a frozen copy of the model taken before training (``base``), moved
    toward the student after each step when ``rate`` is set (``ema``)."""

    copy: nn.Module
    rate: float | None = None

    @torch.no_grad()
    def hidden(self, batch: dict, autocast: Callable) -> tuple[torch.Tensor, nn.Linear]:
        with autocast():
            return final_hidden(self.copy, batch)

    def _pairs(self, student: nn.Module) -> list[tuple[str, torch.Tensor, nn.Parameter]]:
        theirs = dict(self.copy.named_parameters())
        return [(name, theirs[name], p) for name, p in student.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        if self.rate is None:
            return
        for _, mine, theirs in self._pairs(student):
            mine.lerp_(theirs.detach(), self.rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.rate is None:
            return {}
        return {f"ema.{name}": p.detach() for name, p in self.copy.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.rate is None:
            return
        with torch.no_grad():
            for name, p in self.copy.named_parameters():
                p.copy_(state[f"ema.{name}"])


# ------------------------------------------------------------------------------ the objective


def autocast_dtype(autocast: Callable, model: nn.Module) -> torch.dtype | None:
    """The dtype the run's autocast factory computes in on the model's device; None where it is off."""
    device_type = next(model.parameters()).device.type
    with autocast():
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The rollout generator's seed of (run seed, optimizer step, rank): fixed by those three
    alone, so a resumed run draws what the straight run drew."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (1 << 62)


@dataclass
class SDFTObjective:
    """The ``objective=sdft`` part of a run (built by :func:`build_objective`)."""

    cfg: TrainConfig
    tokenizer: object
    prompts: dict[tuple[int, ...], SDFTPrompt]  # a task Example's input_ids -> its prompts
    sources: dict[int, list[Example]]
    teacher: Teacher
    stop_ids: set[int]
    pad_id: int
    device: torch.device
    greedy: bool = False  # tests: argmax rollouts instead of draws
    last: dict = field(default_factory=dict)

    def sampling(self, step: int, rank: int):
        from eval.generate import Sampling

        if self.greedy:
            return None
        return Sampling(self.cfg.sdft_temperature, self.cfg.sdft_top_p, rollout_seed(self.cfg.seed, step, rank))

    def prompt_of(self, key: Key) -> SDFTPrompt:
        example = self.sources[key[0]][key[1]]
        found = self.prompts.get(tuple(example.input_ids))
        if found is None:
            raise RuntimeError(f"sdft: task row {key[1]} has no prompt (its tokens match no row of data)")
        return found

    def sample(self, model: nn.Module, step: int, rank: int, keys: list[Key], autocast: Callable) -> list[list[int]]:
        """``sdft_num_generations`` sampled answers per key (key-major), each ending with the
        stop token that ended it, or cut at ``sdft_max_new_tokens``."""
        from eval.generate import generate_ids

        g = self.cfg.sdft_num_generations
        prompt_ids = [self.prompt_of(key).student_ids for key in keys for _ in range(g)]
        if not prompt_ids:
            return []
        # A bf16 run samples from a bf16 copy of the model (eval.generate.decoding_model: only the
        # parameters a step changed are cast again), not under the run's autocast: autocast would
        # cast every frozen fp32 weight at every decoded token and keeps the lean decoder out.
        precision = "bf16" if autocast_dtype(autocast, model) == torch.bfloat16 else "model"
        return generate_ids(model, prompt_ids, self.cfg.sdft_max_new_tokens, stop_ids=self.stop_ids,
                            pad_id=self.pad_id, sampling=self.sampling(step, rank),
                            batch_size=self.cfg.per_device_train_batch_size * g, precision=precision)

    def examples(self, prompt_ids: list[int], answer: list[int]) -> Example:
        """A context whose labels are the sampled tokens after the skipped first ones."""
        skip = self.cfg.sdft_skip_tokens
        labels = [IGNORE_INDEX] * (len(prompt_ids) + min(skip, len(answer))) + answer[skip:]
        return Example(prompt_ids + answer, labels)

    def rollout(self, model: nn.Module, step: int, rank: int, micros: list[list[Key]],
                plain: Callable[[list[Key]], LossPart], autocast: Callable) -> list[list[LossPart]]:
        t0 = time.time()
        mine = [key for micro in micros for key in micro if key[0] == TASK]
        answers = iter(self.sample(model, step, rank, mine, autocast))
        g = self.cfg.sdft_num_generations
        parts: list[list[LossPart]] = []
        first, sampled = None, 0
        for micro in micros:
            others = [key for key in micro if key[0] != TASK]
            tasks = [key for key in micro if key[0] == TASK]
            step_parts = [plain(others)] if others else []
            if tasks:
                rows, students, teachers = [], [], []
                for key in tasks:
                    prompt = self.prompt_of(key)
                    for _ in range(g):
                        answer = next(answers)
                        first = first or (prompt, answer)
                        sampled += len(answer)
                        rows.append(key)
                        students.append(self.examples(prompt.student_ids, answer))
                        teachers.append(self.examples(prompt.teacher_ids, answer))
                batch = to_device(build_batch(students, self.pad_id, packing=False), self.device)
                teacher_batch = to_device(build_batch(teachers, self.pad_id, packing=False), self.device)
                step_parts.append(LossPart(rows, batch, self.forward_for(teacher_batch)))
            parts.append(step_parts)
        self.last = {"rollout_seconds": time.time() - t0, "rollouts": len(mine) * g, "rollout_tokens": sampled}
        if first is not None:
            self.last["sample_prompt"] = first[0].text  # what a user reads the sampled answer against
            self.last["sample"] = self.tokenizer.decode(first[1], skip_special_tokens=True)
        return parts

    def forward_for(self, teacher_batch: dict) -> Forward:
        def forward(model: nn.Module, batch: dict, autocast: Callable):
            return self.loss_sum(model, batch, teacher_batch, autocast)

        return forward

    def loss_sum(self, model: nn.Module, batch: dict, teacher_batch: dict, autocast: Callable
                 ) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
        """The divergence summed over the sampled positions of ``batch`` (student contexts) and
        ``teacher_batch`` (the same answers after the teacher's prompts), position for position."""
        from kernels.linear_cross_entropy import linear_kl_divergence

        with torch.no_grad():  # the teacher first: nothing of it lives on into the student's backward
            teacher_hidden, teacher_head = self.teacher.hidden(teacher_batch, autocast)
        with autocast():
            hidden, head = final_hidden(model, batch)
            d = hidden.shape[-1]
            at_s = (batch["shift_labels"].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
            at_t = (teacher_batch["shift_labels"].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
            if at_s.numel() != at_t.numel():
                raise RuntimeError(f"sdft: {at_s.numel()} student positions for {at_t.numel()} teacher ones")
            h = hidden.reshape(-1, d).index_select(0, at_s)
            if at_s.numel() == 0:
                return h.sum() * 0.0, hidden, head  # keeps the graph (and DDP's bookkeeping) alike
            h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).index_select(0, at_t)
            divergence = self.cfg.sdft_divergence
            loss = linear_kl_divergence(h, head.weight, h_t, teacher_head.weight.detach(), kind=divergence,
                                        bias_student=head.bias, bias_teacher=teacher_head.bias,
                                        beta=self.cfg.sdft_jsd_beta)
        return loss, hidden, head

    def after_step(self, model: nn.Module) -> None:
        self.teacher.after_step(model)

    def step_metrics(self) -> dict:
        return dict(self.last)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher.load_state_dict(state)


def build_teacher(cfg: TrainConfig, model: nn.Module, lora: bool) -> Teacher:
    """The teacher on the model *before* training (so ``base`` is the base)."""
    if lora:
        if cfg.sdft_teacher == "ema":
            return LoRAEMATeacher(model, cfg.sdft_ema_rate)
        return AdaptersOffTeacher(model)
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    return FrozenCopyTeacher(frozen, cfg.sdft_ema_rate if cfg.sdft_teacher == "ema" else None)


def build_objective(cfg: TrainConfig, model: nn.Module, tokenizer, task_rows: list[dict], lora: bool,
                    fused_head: bool, sources: dict[int, list[Example]], pad_id: int,
                    device: torch.device) -> SDFTObjective | None:
    """The run's objective part (None for the plain loss: ``objective=sft`` or ``dft``, which
    ``trainer.loss`` computes)."""
    if cfg.objective != "sdft":
        return None
    if not fused_head:
        raise ConfigError("objective=sdft needs the fused linear head (its divergence runs chunk by chunk on the "
                          "hidden states); this model's head is not a plain linear map (see the 'loss:' line)")
    from eval.chat import end_of_turn_ids

    max_prompt = max(1, cfg.max_length - cfg.sdft_max_new_tokens)
    prompts: dict[tuple[int, ...], SDFTPrompt] = {}
    for row in task_rows:
        prompt = sdft_prompt(tokenizer, row, cfg.sdft_template, max_prompt)
        prompts[tuple(encode_row(tokenizer, row).input_ids[:cfg.max_length])] = prompt
    stop_ids = end_of_turn_ids(tokenizer) if has_chat_template(tokenizer) else set()
    if tokenizer.eos_token_id is not None:
        stop_ids.add(int(tokenizer.eos_token_id))
    return SDFTObjective(cfg, tokenizer, prompts, sources, build_teacher(cfg, model, lora), stop_ids, pad_id,
                         device)
