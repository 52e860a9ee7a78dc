"""The exact per-sample Fisher diagonal of a causal LM, in one ordinary forward+backward
per batch.

Definition (what :func:`estimate_fisher` returns, per parameter θ that requires grad):

    F = (1/N) Σₙ (∇θ ℓₙ)²,     ℓₙ = Σₜ log p(y_{n,t} | y_{n,<t})

over sample n's unmasked label tokens (HF's causal shift: ``logits[:, t]`` predicts
``labels[:, t + 1]``; labels of -100 and positions with ``attention_mask == 0`` are left
out).  One sample = one row of a batch; N counts the rows that have at least one label
token (rows without any contribute a zero gradient and are not counted).  Packing (several
documents in one row) is **off** for Fisher passes: a packed row would be one sample.

``kind="empirical"`` uses the data's labels.  ``kind="mc"`` replaces each label that is not
-100 by a draw from the model's own predictive distribution at that position (seeded by
``seed``; see :func:`sample_mc_labels`): one Monte-Carlo sample of the true Fisher, which
the literature recommends over the empirical one (Kunstner et al. 2019).

How (no per-sample backward passes, no N copies of the parameters):

* every embedding output is turned into a fresh leaf that requires grad and the pass calls
  ``torch.autograd.grad(Σₙ ℓₙ, those leaves)``: nothing is accumulated into any ``.grad``,
  and autograd skips the weight-gradient matmuls it would otherwise compute;
* forward hooks keep each layer's input; a tensor hook on its output receives ``dy``
  during the backward and immediately adds the per-sample squares into the accumulator:
  linear layers (``nn.Linear``, GPT-2 ``Conv1D``, ``LoRALinear``'s A and B) through
  :func:`kernels.fisher.linear_grad_and_fisher_`, biases as ``(Σₜ dy)²``, embeddings by
  scattering each sample's rows, other small leaf modules (norms) by ``torch.func.vmap``.
  Since samples are independent in eval mode, ``dy`` of the summed loss restricted to row n
  is exactly ``∂ℓₙ/∂y_n``.
* trailing columns that are padding in every row are cut before the forward
  (:func:`drop_padding_columns`): batches padded to a fixed length cost what their longest
  row costs;
* positions after a row's last label token cannot influence its loss in a causal LM, so
  their ``dy`` is exactly zero in every layer: the linear layers' per-sample products stop
  at each row's last label position (``lengths`` of the kernel).  The skipped rows of ``dy``
  are checked to be zero, and a layer whose are not (a model that is not causal) is
  processed in full, so the result is exact either way;
* a tied ``lm_head`` / input embedding gets the Fisher of the *summed* per-sample gradient
  ``(G_head,n + G_emb,n)²``: the head's part comes from the kernel, the cross term and the
  embedding's part are added on the rows each sample touches.

``include_embeddings=False`` leaves ``nn.Embedding`` weights (and a head tied to them) out
of the result: they are the largest and sparsest tensors and EWC on them is rarely wanted.
The model is in eval mode during the pass (dropout off; each module's mode is restored) and
its parameters and ``.grad`` are left exactly as they were.  Accumulators and results are fp32.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kernels.fisher import linear_grad_and_fisher_

# Bound on the per-sample gradient block held when vmap-ing small leaf modules.
_VMAP_CHUNK_BYTES = 32 << 20


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_lora(module: nn.Module) -> bool:
    # Duck-typed so this works with kernels.lora_layers.LoRALinear without importing it.
    return all(hasattr(module, a) for a in ("lora_A", "lora_B", "scale", "weight"))


def _samples_first(t: torch.Tensor, n: int) -> torch.Tensor:
    """(N, ..., features) -> (N, T, features) with T the product of the middle dims (a view
    when the input is already 3-D, whatever its strides: the kernels take strided inputs)."""
    if t.dim() == 3:
        return t
    return t.reshape(n, -1, t.shape[-1])


def sample_mc_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels for ``kind="mc"``: where ``labels[:, t + 1] != -100`` draw a token from
    ``softmax(logits[:, t])``; -100 stays -100 and ``labels[:, 0]`` is kept (never used)."""
    shifted_mask = labels[:, 1:] != -100
    out = labels.clone()
    if shifted_mask.any():
        probs = torch.softmax(logits[:, :-1].detach()[shifted_mask].float(), dim=-1)
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        out[:, 1:][shifted_mask] = drawn.to(out.dtype)
    return out


def masked_labels(batch: dict) -> torch.Tensor:
    """The batch's labels with padding (``attention_mask == 0``) set to -100."""
    labels = batch.get("labels")
    if labels is None:
        raise KeyError("Fisher batches need 'labels' (-100 where no loss is taken)")
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    return labels


def drop_padding_columns(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor):
    """Cut the trailing columns that are padding in every row (a batch padded to a fixed
    length): they hold no tokens of any sample, so with a model that honours the attention
    mask the result is the same, for less work."""
    if attention_mask is None or attention_mask.dim() != 2:
        return input_ids, attention_mask, labels
    used = attention_mask.ne(0).any(dim=0).nonzero()
    if used.numel() == 0:  # no tokens at all: left as it is (it has no labels either)
        return input_ids, attention_mask, labels
    end = int(used.max()) + 1
    if end == input_ids.shape[1]:
        return input_ids, attention_mask, labels
    return input_ids[:, :end], attention_mask[:, :end], labels[:, :end]


# Logits held at once when Monte-Carlo labels are drawn from hidden states (one chunk covers a
# typical batch, so the draws are the same as from the full logits).
_MC_CHUNK_BYTES = 256 << 20


def fusable_head(model: nn.Module, fisher_pass: _FisherPass) -> nn.Linear | None:
    """The model's linear output head when the pass needs no Fisher for its weight (LoRA-EWC's
    target weights, or a tied head left out with the embeddings): then the pass runs on hidden
    states and the fused linear cross-entropy, never building the ``[N, T, vocab]`` logits."""
    from trainer.loss import head_attribute

    found = head_attribute(model)
    if found is None or type(found[1]) is not nn.Linear:
        return None
    head = found[1]
    wanted = set(fisher_pass.acc)
    return None if id(head.weight) in wanted or (head.bias is not None and id(head.bias) in wanted) else head


def _summed_nll(scores: torch.Tensor, head: nn.Linear | None, targets: torch.Tensor) -> torch.Tensor:
    """Σ -log p(target) over the labelled positions, from logits (``head`` None) or hidden states."""
    if head is None:
        return torch.nn.functional.cross_entropy(scores.reshape(-1, scores.shape[-1]).float(), targets.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    from kernels.linear_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(scores, head.weight, targets, bias=head.bias, reduction="sum")


@torch.no_grad()
def sample_mc_labels_from_hidden(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                                 generator: torch.Generator) -> torch.Tensor:
    """:func:`sample_mc_labels` from the hidden states: the logits of the labelled positions
    only, a chunk of rows at a time."""
    shifted_mask = labels[:, 1:] != -100
    out = labels.clone()
    h = hidden[:, :-1][shifted_mask]
    rows = max(1, _MC_CHUNK_BYTES // (4 * head.out_features))
    drawn = []
    for start in range(0, h.shape[0], rows):
        logits = torch.nn.functional.linear(h[start:start + rows].float(), head.weight.float(),
                                            None if head.bias is None else head.bias.float())
        drawn.append(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1))
    if drawn:
        out[:, 1:][shifted_mask] = torch.cat(drawn).to(out.dtype)
    return out


class _FisherPass:
    """Hooks on the model that turn one forward + autograd.grad into Fisher accumulation."""

    def __init__(self, model: nn.Module, include_embeddings: bool) -> None:
        self.model = model
        wanted = {id(p): (name, p) for name, p in model.named_parameters() if p.requires_grad}
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if not embeddings:
            raise ValueError("estimate_fisher needs a model with an nn.Embedding input layer")
        if not include_embeddings:
            for m in embeddings:
                wanted.pop(id(m.weight), None)
        self.names = {pid: name for pid, (name, _) in wanted.items()}
        self.acc = {pid: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    for pid, (_, p) in wanted.items()}
        self.embeddings = embeddings
        self.tied_head: dict[int, nn.Module] = {}  # embedding weight id -> the tied linear head
        self.handled: set[int] = set()
        self.jobs: list[tuple[nn.Module, str]] = []  # (module, kind) that get hooks
        emb_ids = {id(m.weight) for m in embeddings}
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in self.acc]
            if isinstance(module, nn.Embedding):
                self.jobs.append((module, "embedding"))  # always: its output roots the graph
            elif not own:
                continue  # frozen layer (e.g. the base of a LoRA model): nothing to capture
            elif _is_lora(module):
                self.jobs.append((module, "lora"))
            elif isinstance(module, nn.Linear) or _is_conv1d(module):
                if id(module.weight) in emb_ids:
                    self.tied_head[id(module.weight)] = module
                self.jobs.append((module, "conv1d" if _is_conv1d(module) else "linear"))
            else:
                if any(True for _ in module.children()):
                    names = ", ".join(self.names[id(p)] for p in own)
                    raise NotImplementedError(
                        f"estimate_fisher: parameters {names} belong to a {type(module).__name__} that "
                        "also has submodules; per-sample gradients are only computed for leaf modules"
                    )
                self.jobs.append((module, "generic"))
            self.handled.update(id(p) for p in own)
        missing = [self.names[pid] for pid in self.acc if pid not in self.handled]
        if missing:
            raise NotImplementedError(f"estimate_fisher cannot reach parameters {missing[:5]}")
        self.handles: list = []
        self.reset_batch(0)

    # ------------------------------------------------------------------ per batch state
    def reset_batch(self, n: int) -> None:
        self.n = n
        self.lengths: torch.Tensor | None = None  # per row: positions that can carry gradient
        self.capturing = True
        self.pending: dict[int, list] = {}    # module id -> [(x, dy or None), ...] per call
        self.leaves: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # (emb, ids, leaf)
        self.head_rows: dict[int, tuple] = {}  # tied weight id -> (keys, head per-sample rows)

    def set_lengths(self, targets: torch.Tensor) -> None:
        """Rows' gradient-carrying prefix from the shifted labels: ``logits[:, t]`` is scored
        against ``targets[:, t]``, so position t matters only up to the last scored one."""
        positions = torch.arange(targets.shape[1], device=targets.device)
        lengths = torch.where(targets != -100, positions + 1, 0).amax(dim=1)
        seq = targets.shape[1] + 1
        if int(lengths.min()) >= seq:
            return  # nothing to skip
        self.lengths = lengths
        self.seq = seq
        self.shortest = int(lengths.min())
        # (N, T - shortest): True where a position is past its row's length
        self.skipped = torch.arange(self.shortest, seq, device=targets.device).unsqueeze(0) >= lengths.unsqueeze(1)

    def _lengths_for(self, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor | None:
        """The row lengths when this layer's rows are sequence positions and every skipped
        row of ``dy`` is zero (so skipping is exact), else None (process every row)."""
        if self.lengths is None or dy.dim() != 3 or dy.shape[:2] != (self.n, self.seq):
            return None
        tail = dy[:, self.shortest:]
        if bool(tail.ne(0).any(dim=2).logical_and_(self.skipped).any()):
            return None
        return self.lengths

    def install(self) -> None:
        for module, kind in self.jobs:
            self.handles.append(module.register_forward_hook(self._forward_hook(module, kind)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _forward_hook(self, module: nn.Module, kind: str):
        def hook(mod, args, output):
            if not self.capturing:
                return None
            if kind == "embedding":
                ids = args[0]
                out = output.detach()
                if out.shape[0] != self.n:  # e.g. GPT-2 position embeddings, shape (1, T, H)
                    out = out.expand(self.n, *out.shape[1:]).contiguous()
                    ids = ids.expand(self.n, *ids.shape[1:])
                leaf = out.requires_grad_(True)
                self.leaves.append((mod, ids, leaf))
                return leaf
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            calls = self.pending.setdefault(id(mod), [])
            index = len(calls)
            calls.append([args[0].detach(), None])
            output.register_hook(lambda dy: self._on_grad(mod, kind, index, dy))
            return None
        return hook

    def _on_grad(self, module: nn.Module, kind: str, index: int, dy: torch.Tensor) -> None:
        calls = self.pending[id(module)]
        calls[index][1] = dy.detach()
        if all(c[1] is not None for c in calls):
            self._process(module, kind, calls)
            calls.clear()

    def flush(self) -> None:
        """Process modules whose every call did not receive a gradient during the backward."""
        for module, kind in self.jobs:
            calls = [c for c in self.pending.get(id(module), []) if c[1] is not None]
            if calls:
                self._process(module, kind, calls)
        self.pending.clear()

    # ------------------------------------------------------------------ per-sample squares
    def _process(self, module: nn.Module, kind: str, calls: list) -> None:
        # Several calls of one module in a forward add their per-sample gradients: joining
        # them along T before squaring keeps (sum of the calls)^2 per sample.
        n = self.n
        if len(calls) == 1:  # the usual case: no copy
            x, dy = _samples_first(calls[0][0], n), _samples_first(calls[0][1], n)
        else:
            x = torch.cat([_samples_first(c[0], n) for c in calls], dim=1)
            dy = torch.cat([_samples_first(c[1], n) for c in calls], dim=1)
        acc = self.acc
        self.capturing = False
        try:
            if kind in ("linear", "conv1d"):
                w, b = module.weight, module.bias
                if id(w) in acc:
                    lengths = self._lengths_for(x, dy) if len(calls) == 1 else None
                    if kind == "conv1d":  # y = x W + b, W stored [in, out]
                        linear_grad_and_fisher_(dy, x, None, acc[id(w)], lengths=lengths)
                    else:
                        linear_grad_and_fisher_(x, dy, None, acc[id(w)], lengths=lengths)
                    if id(w) in self.tied_head:
                        self._remember_head_rows(w, x, dy)
                if b is not None and id(b) in acc:
                    acc[id(b)].add_(dy.float().sum(1).square().sum(0))
            elif kind == "lora":
                self._process_lora(module, x, dy, self._lengths_for(x, dy) if len(calls) == 1 else None)
            elif kind == "generic":
                self._process_generic(module, x, dy)
        finally:
            self.capturing = True

    def _process_lora(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor,
                      lengths: torch.Tensor | None) -> None:
        acc = self.acc
        w, b, A, B, s = module.weight, module.bias, module.lora_A, module.lora_B, float(module.scale)
        if id(w) in acc:
            if getattr(module, "fan_in_fan_out", False):
                linear_grad_and_fisher_(dy, x, None, acc[id(w)], lengths=lengths)
            else:
                linear_grad_and_fisher_(x, dy, None, acc[id(w)], lengths=lengths)
        if b is not None and id(b) in acc:
            acc[id(b)].add_(dy.float().sum(1).square().sum(0))
        # y = ... + s (x A^T) B^T:  dA_n = s (dy_n B)^T x_n,  dB_n = s dy_n^T (x_n A^T)
        if id(A) in acc:
            linear_grad_and_fisher_(x, torch.matmul(dy, B.detach().to(dy.dtype)) * s, None, acc[id(A)],
                                    lengths=lengths)
        if id(B) in acc:
            linear_grad_and_fisher_(torch.matmul(x, A.detach().t().to(x.dtype)) * s, dy, None, acc[id(B)],
                                    lengths=lengths)

    def _process_generic(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
        names = [k for k, p in module.named_parameters(recurse=False) if id(p) in self.acc]
        params = {k: getattr(module, k).detach() for k in names}

        def contribution(p, xn, dyn):
            out = torch.func.functional_call(module, p, (xn.unsqueeze(0),))
            return (out * dyn.unsqueeze(0)).sum()

        per_sample_grad = torch.func.vmap(torch.func.grad(contribution), in_dims=(None, 0, 0))
        numel = sum(p.numel() for p in params.values())
        chunk = max(1, _VMAP_CHUNK_BYTES // max(1, 4 * numel))
        for start in range(0, self.n, chunk):
            grads = per_sample_grad(params, x[start:start + chunk], dy[start:start + chunk])
            for k in names:
                self.acc[id(getattr(module, k))].add_(grads[k].float().square().sum(0))

    def _keys(self, ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unique (sample, token) pairs of a batch as keys ``n * vocab + id``, and the inverse."""
        rows = torch.arange(self.n, device=ids.device).unsqueeze(1) * vocab
        return torch.unique((rows + ids).reshape(-1), return_inverse=True)

    def _remember_head_rows(self, w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> None:
        """For a head tied to the input embedding: sample n's head gradient on the rows of the
        tokens sample n feeds in (needed for the cross term of (G_head + G_emb)^2)."""
        emb = next(m for m in self.embeddings if m.weight is w)
        ids = next(i for m, i, _ in self.leaves if m is emb)
        vocab = w.shape[0]
        keys, _ = self._keys(ids, vocab)
        sample, token = keys // vocab, keys % vocab
        rows = torch.empty((len(keys), w.shape[1]), dtype=torch.float32, device=w.device)
        for n in range(self.n):  # per sample: (T, u) x (T, H) -> u rows; no (u, T, H) block
            sel = (sample == n).nonzero().squeeze(1)
            rows[sel] = dy[n][:, token[sel]].float().t() @ x[n].float()
        self.head_rows[id(w)] = (keys, rows)

    def process_embeddings(self, grads: list[torch.Tensor | None]) -> None:
        for (emb, ids, _), dy in zip(self.leaves, grads, strict=True):
            w = emb.weight
            if dy is None or id(w) not in self.acc:
                continue
            vocab, hidden = w.shape
            keys, inverse = self._keys(ids, vocab)
            per_sample = torch.zeros((len(keys), hidden), dtype=torch.float32, device=dy.device)
            per_sample.index_add_(0, inverse, dy.reshape(-1, hidden).float())
            token = keys % vocab
            if emb.padding_idx is not None:  # nn.Embedding never updates the padding row
                per_sample[token == emb.padding_idx] = 0.0
            contribution = per_sample.square()
            if id(w) in self.head_rows:
                head_keys, head_rows = self.head_rows.pop(id(w))
                if not torch.equal(head_keys, keys):
                    raise RuntimeError("estimate_fisher: tied head and embedding saw different tokens")
                # (h + e)^2 = h^2 + (e^2 + 2 h e): the head's h^2 is already in the accumulator
                contribution.add_(2.0 * head_rows * per_sample)
            self.acc[id(w)].index_add_(0, token, contribution)


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[dict],
    kind: str = "empirical",
    seed: int = 0,
    include_embeddings: bool = True,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The exact per-sample Fisher diagonal ``F = (1/N) Σₙ (∇θ ℓₙ)²`` (see the module
    docstring for ℓₙ, the sample count N, ``kind`` and ``include_embeddings``), as fp32
    tensors keyed by the ``named_parameters()`` names of the parameters that require grad.

    ``batches``: dicts with ``input_ids``, ``attention_mask`` and ``labels`` (-100 =
    ignored), one sample per row, no packing.  ``kind``: ``"empirical"`` or ``"mc"``.
    """
    if kind not in ("empirical", "mc"):
        raise ValueError(f"estimate_fisher kind must be 'empirical' or 'mc', got {kind!r}")
    fisher_pass = _FisherPass(model, include_embeddings)
    fused_head = fusable_head(model, fisher_pass) is not None
    modes = {m: m.training for m in model.modules()}
    generator = None
    samples = 0
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"fisher ({kind})", unit="batch")
    model.eval()
    fisher_pass.install()
    try:
        for batch in batches:
            input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
            labels = masked_labels(batch).to(input_ids.device)
            input_ids, attention_mask, labels = drop_padding_columns(input_ids, attention_mask, labels)
            fisher_pass.reset_batch(input_ids.shape[0])
            if kind == "mc" and generator is None:
                generator = torch.Generator(device=input_ids.device).manual_seed(seed)
            with torch.enable_grad():
                if fused_head:  # the head's own weight is not in the Fisher: no [N, T, vocab] logits
                    from trainer.loss import hidden_states_out

                    with hidden_states_out(model) as head:
                        hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                    if kind == "mc":
                        labels = sample_mc_labels_from_hidden(hidden, head, labels, generator)
                    scores = (hidden[:, :-1], head)
                else:
                    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                    if kind == "mc":
                        labels = sample_mc_labels(logits, labels, generator)
                    scores = (logits[:, :-1], None)
                targets = labels[:, 1:]
                rows_with_labels = int((targets != -100).any(dim=1).sum())
                if rows_with_labels == 0:
                    continue
                samples += rows_with_labels
                fisher_pass.set_lengths(targets)
                log_likelihood = -_summed_nll(*scores, targets)
                leaves = [leaf for _, _, leaf in fisher_pass.leaves]
                grads = torch.autograd.grad(log_likelihood, leaves, allow_unused=True)
            fisher_pass.flush()
            fisher_pass.process_embeddings(list(grads))
            del scores, log_likelihood, grads, leaves
            fisher_pass.reset_batch(0)
    finally:
        fisher_pass.remove()
        for m, training in modes.items():
            m.training = training
    if samples == 0:
        raise ValueError("estimate_fisher: the batches contain no label tokens (all labels are -100)")
    return {fisher_pass.names[pid]: acc.div_(samples) for pid, acc in fisher_pass.acc.items()}
