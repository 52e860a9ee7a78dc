"""estimate_fisher against a brute-force oracle: one sample at a time (no padding), backward
of its summed log-likelihood with plain autograd, gradient squared, averaged over samples."""
import pytest
import torch
from tiny_models import PAD_ID, TINY_VOCAB_SIZE, tiny_gpt2, tiny_llama, tiny_qwen2

from trainer.fisher import estimate_fisher, masked_labels, sample_mc_labels


def _batches(seed=0):
    """Two right-padded batches; some prompt tokens are -100, one row has no labels at all."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ([7, 5, 3], [6, 6, 4, 2]):
        n, t = len(lengths), max(lengths)
        ids = torch.randint(0, 256, (n, t), generator=g)
        mask = torch.zeros(n, t, dtype=torch.long)
        for i, length in enumerate(lengths):
            mask[i, :length] = 1
        ids = ids.masked_fill(mask == 0, PAD_ID)
        labels = ids.clone()  # padded labels deliberately NOT -100: the mask must drop them
        labels[0, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    out[1]["labels"][3] = -100  # a row without label tokens: not counted as a sample
    return out


def _oracle(model, batches, labels_per_batch=None):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    samples = 0
    for b, batch in enumerate(batches):
        labels = masked_labels(batch) if labels_per_batch is None else labels_per_batch[b]
        for i in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][i].sum())
            row_labels = labels[i, 1:length]
            if (row_labels != -100).sum() == 0:
                continue
            logits = model(input_ids=batch["input_ids"][i:i + 1, :length]).logits[0, :-1]
            log_likelihood = -torch.nn.functional.cross_entropy(
                logits, row_labels, ignore_index=-100, reduction="sum")
            grads = torch.autograd.grad(log_likelihood, list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads, strict=True):
                if grad is not None:
                    acc[name] += grad.double() ** 2
            samples += 1
    return {n: a / samples for n, a in acc.items()}


def _assert_matches(fisher, reference, rtol=1e-4):
    assert list(fisher) == list(reference)  # same names, named_parameters order
    for name, ref in reference.items():
        assert fisher[name].dtype == torch.float32 and fisher[name].shape == ref.shape
        err = (fisher[name].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
        assert err < rtol, f"{name}: relative error {err:.2e}"
        assert ref.abs().max() > 0, f"{name}: oracle Fisher is zero, the test would not see a bug"


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_gpt2], ids=["llama", "qwen2-bias", "gpt2-tied"])
def test_empirical_fisher_matches_per_sample_oracle(build):
    model = build()
    batches = _batches()
    fisher = estimate_fisher(model, batches)
    _assert_matches(fisher, _oracle(model, batches))


def test_mc_fisher_matches_oracle_with_the_same_sampled_labels():
    model = tiny_llama(seed=1)
    batches = _batches(seed=1)
    fisher = estimate_fisher(model, batches, kind="mc", seed=7)
    # Redraw the labels exactly as estimate_fisher does: one generator, batches in order.
    generator = torch.Generator().manual_seed(7)
    sampled = []
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            sampled.append(sample_mc_labels(logits, masked_labels(batch), generator))
    assert not torch.equal(sampled[0], masked_labels(batches[0]))  # really resampled
    assert torch.equal(sampled[0] == -100, masked_labels(batches[0]) == -100)
    _assert_matches(fisher, _oracle(model, batches, sampled))


def test_lora_model_fisher_of_lora_parameters():
    from kernels.lora_layers import apply_lora

    model = tiny_gpt2(seed=2)  # Conv1D bases: fan_in_fan_out LoRA layers
    apply_lora(model, r=3, alpha=6)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B = 0 at init would make dA = 0: give B values
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    batches = _batches(seed=2)
    fisher = estimate_fisher(model, batches)
    assert fisher and all(".lora_" in n for n in fisher)
    _assert_matches(fisher, _oracle(model, batches))


def test_leaves_parameters_grads_and_modes_untouched_and_can_skip_embeddings():
    model = tiny_llama(seed=3, tie_word_embeddings=True)
    model.train()
    model.model.layers[0].eval()  # a mixed-mode model: each module's flag must come back
    grads = {}
    for name, p in model.named_parameters():
        if "layers.1" in name:
            p.grad = torch.randn_like(p)
        grads[name] = None if p.grad is None else p.grad.clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    batches = _batches(seed=3)
    fisher = estimate_fisher(model, batches, include_embeddings=False)

    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert (p.grad is None) == (grads[name] is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name]), name
    assert {n: m.training for n, m in model.named_modules()} == modes
    # The tied embedding / lm_head weight is left out; everything else is there and exact.
    assert "model.embed_tokens.weight" not in fisher
    model.eval()
    reference = _oracle(model, batches)
    reference.pop("model.embed_tokens.weight")
    _assert_matches(fisher, reference)


def test_tied_llama_embedding_fisher_includes_the_cross_term():
    model = tiny_llama(seed=4, tie_word_embeddings=True, vocab_size=TINY_VOCAB_SIZE)
    batches = _batches(seed=4)
    _assert_matches(estimate_fisher(model, batches), _oracle(model, batches))


def test_errors_are_actionable():
    model = tiny_llama()
    with pytest.raises(ValueError, match="kind"):
        estimate_fisher(model, _batches(), kind="true")
    batch = _batches()[0]
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="no label tokens"):
        estimate_fisher(model, [batch])


@pytest.mark.interpret
def test_empirical_fisher_through_the_triton_interpreter():
    # The gradients tensor hooks receive come with whatever strides autograd produced: the
    # Triton kernel must take them as they are.
    from kernels import backend

    model = tiny_llama(seed=5, num_hidden_layers=1)
    batches = _batches(seed=5)[:1]
    with backend.forced("triton"):
        fisher = estimate_fisher(model, batches)
    _assert_matches(fisher, _oracle(model, batches))


def _spy_lengths(monkeypatch):
    """Record the ``lengths`` every Fisher kernel call of trainer.fisher receives."""
    import trainer.fisher as fisher_mod

    seen = []
    real = fisher_mod.linear_grad_and_fisher_

    def spy(x, dy, grad_acc, fisher_acc, **kwargs):
        seen.append(kwargs.get("lengths"))
        return real(x, dy, grad_acc, fisher_acc, **kwargs)

    monkeypatch.setattr(fisher_mod, "linear_grad_and_fisher_", spy)
    return seen


def test_padded_rows_are_skipped_after_their_last_label(monkeypatch):
    # The exactness is the oracle test's; this one checks the skipping really happens, with
    # the lengths the labels give (row 0 of batch 0: 7 tokens, logits 0..5 scored -> 6).
    seen = _spy_lengths(monkeypatch)
    model = tiny_llama(seed=6)
    batches = _batches(seed=6)
    fisher = estimate_fisher(model, batches)
    assert seen and all(lengths is not None for lengths in seen)
    assert seen[0].tolist() == [6, 4, 2]
    assert seen[-1].tolist() == [5, 5, 3, 0]  # the row without labels: nothing to multiply
    _assert_matches(fisher, _oracle(model, batches))


class _AntiCausal(torch.nn.Module):
    """A toy LM whose position t sees every later position (a reversed cumulative sum): the
    gradient reaches positions after the last label, so nothing may be skipped there."""

    def __init__(self, vocab=TINY_VOCAB_SIZE, hidden=8):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = torch.tanh(self.mix(self.embed(input_ids)))
        h = h.flip(1).cumsum(1).flip(1)  # h_t = sum of h_s for s >= t
        return type("Out", (), {"logits": self.head(h)})()


def test_a_model_that_is_not_causal_gets_every_position(monkeypatch):
    seen = _spy_lengths(monkeypatch)
    model = _AntiCausal().eval()
    batches = _batches(seed=7)
    fisher = estimate_fisher(model, batches)
    # The head's gradient is zero after the last label (it is applied position-wise); the
    # mixing layer's is not, so it must have been processed without lengths.
    assert any(lengths is None for lengths in seen) and any(lengths is not None for lengths in seen)
    # Oracle: each padded row on its own (the padding is part of the non-causal input).
    params = dict(model.named_parameters())
    reference = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    samples = 0
    for batch in batches:
        labels = masked_labels(batch)
        for i in range(labels.shape[0]):
            if (labels[i, 1:] != -100).sum() == 0:
                continue
            logits = model(batch["input_ids"][i:i + 1]).logits[0, :-1]
            ll = -torch.nn.functional.cross_entropy(logits, labels[i, 1:], ignore_index=-100, reduction="sum")
            for n, g in zip(params, torch.autograd.grad(ll, list(params.values())), strict=True):
                reference[n] += g.double() ** 2
            samples += 1
    _assert_matches(fisher, {n: r / samples for n, r in reference.items()})


def test_columns_that_are_padding_in_every_row_are_cut_before_the_forward(monkeypatch):
    model = tiny_llama(seed=8)
    batches = _batches(seed=8)
    widened = []
    for batch in batches:  # three more all-padding columns, as a fixed-length collator makes
        n = batch["input_ids"].shape[0]
        widened.append({
            "input_ids": torch.cat([batch["input_ids"], torch.full((n, 3), PAD_ID)], dim=1),
            "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(n, 3, dtype=torch.long)], dim=1),
            "labels": torch.cat([batch["labels"], torch.full((n, 3), 5)], dim=1),  # masked out anyway
        })
    widths = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda input_ids, **kw: (widths.append(input_ids.shape[1]),
                                                                  real_forward(input_ids=input_ids, **kw))[1])
    fisher = estimate_fisher(model, widened)
    assert widths == [7, 6]  # the longest row of each batch
    monkeypatch.undo()
    _assert_matches(fisher, _oracle(model, batches))


@pytest.mark.parametrize("kind", ["empirical", "mc"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-tied"])
def test_a_head_outside_the_fisher_runs_on_hidden_states_with_the_same_result(build, kind, monkeypatch):
    """LoRA-EWC's Fisher pass wants the adapted weights only: the head is then not in the Fisher and
    the pass takes hidden states + the fused linear cross-entropy (no [N, T, vocab] logits); the
    result must still be the per-sample oracle's (MC: with the labels the same draws give)."""
    import trainer.fisher as fisher_module

    model = build(seed=4)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("q_proj.weight", "c_attn.weight", "mlp.up_proj.weight", "c_fc.weight")))
    batches = _batches(seed=4)
    fused_calls = []
    real = fisher_module._summed_nll
    monkeypatch.setattr(fisher_module, "_summed_nll",
                        lambda scores, head, targets: fused_calls.append(head is not None) or real(scores, head, targets))
    fisher = estimate_fisher(model, batches, kind=kind, seed=5)
    assert fused_calls and all(fused_calls)
    labels = None
    if kind == "mc":  # the oracle's labels: the same generator over the same positions, from full logits
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            labels = [sample_mc_labels(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                       masked_labels(b), generator) for b in batches]
    _assert_matches(fisher, _oracle(model, batches, labels))
