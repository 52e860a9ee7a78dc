"""linear_grad_and_fisher against a float64 per-sample einsum and BackPACK's SumGradSquared."""
import warnings

import pytest
import torch

from kernels import backend
from kernels.fisher import linear_grad_and_fisher, linear_grad_and_fisher_


def _reference(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 per-sample gradients materialised, then summed and squared-and-summed."""
    x64, dy64 = x.double(), dy.double()
    if x.dim() == 2:
        x64, dy64 = x64.unsqueeze(1), dy64.unsqueeze(1)
    per_sample = torch.einsum("nto,nti->noi", dy64, x64)
    return per_sample.sum(0), per_sample.square().sum(0)


def _backpack_sum_grad_squared(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    layer = extend(torch.nn.Linear(x.shape[-1], dy.shape[-1], bias=False).double())
    # The "loss" sum_n <y_n, dy_n> has dy_n as its gradient w.r.t. y_n, so BackPACK's
    # per-sample gradients are dy_n^T x_n, the same quantity the kernel squares.
    loss = (layer(x.double()) * dy.double()).sum()
    with warnings.catch_warnings():
        # BackPACK's module hooks fire on outputs only: x does not require grad, by design.
        warnings.filterwarnings("ignore", message="Full backward hook")
        with backpack(SumGradSquared()):
            loss.backward()
    return layer.weight.sum_grad_squared.detach()


def _assert_close(got, want, rtol=1e-5):
    scale = want.abs().max().clamp_min(1e-30)
    err = (got.double() - want).abs().max() / scale
    assert err < rtol, f"max error {err:.3e} (relative to max |ref|)"


SHAPES = [  # (N, T or None, in, out)
    (3, 5, 7, 11),
    (1, 9, 13, 6),     # N = 1
    (4, 1, 10, 5),     # T = 1 as a 3-D input
    (5, None, 12, 9),  # 2-D input
    (1, None, 3, 2),
]


def _inputs(n, t, i, o, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape_x = (n, i) if t is None else (n, t, i)
    shape_dy = (n, o) if t is None else (n, t, o)
    return torch.randn(shape_x, generator=g), torch.randn(shape_dy, generator=g)


@pytest.mark.parametrize("n,t,i,o", SHAPES)
def test_torch_path_matches_float64_and_backpack(n, t, i, o):
    x, dy = _inputs(n, t, i, o)
    grad_ref, fisher_ref = _reference(x, dy)
    with backend.forced("torch"):
        grad, fisher = linear_grad_and_fisher(x, dy)
    assert grad.dtype == fisher.dtype == torch.float32
    _assert_close(grad, grad_ref)
    _assert_close(fisher, fisher_ref)
    _assert_close(fisher, _backpack_sum_grad_squared(x, dy))


def test_torch_path_row_tiles_and_strided_inputs(monkeypatch):
    import kernels.fisher as fisher_mod

    # 64-row tiles over 150 output rows (two full tiles and a ragged one), transposed inputs.
    monkeypatch.setattr(fisher_mod, "TORCH_TILE_BYTES", 1)
    x = torch.randn(6, 11, 5).transpose(1, 2)  # (6, 5, 11) strided
    dy = torch.randn(6, 150, 5).transpose(1, 2)
    grad_ref, fisher_ref = _reference(x, dy)
    with backend.forced("torch"):
        grad, fisher = linear_grad_and_fisher(x, dy)
    _assert_close(grad, grad_ref)
    _assert_close(fisher, fisher_ref)


def test_in_place_variant_adds_and_accepts_no_grad():
    x1, dy1 = _inputs(3, 4, 6, 5, seed=1)
    x2, dy2 = _inputs(2, 4, 6, 5, seed=2)
    g_ref = _reference(x1, dy1)[0] + _reference(x2, dy2)[0]
    f_ref = _reference(x1, dy1)[1] + _reference(x2, dy2)[1]
    grad = torch.zeros(5, 6)
    fisher = torch.zeros(5, 6)
    with backend.forced("torch"):
        linear_grad_and_fisher_(x1, dy1, grad, fisher)
        linear_grad_and_fisher_(x2, dy2, grad, fisher)
        fisher_only = torch.zeros(5, 6)
        linear_grad_and_fisher_(x1, dy1, None, fisher_only)
    _assert_close(grad, g_ref)
    _assert_close(fisher, f_ref)
    _assert_close(fisher_only, _reference(x1, dy1)[1])


def test_bf16_inputs_accumulate_in_fp32():
    x, dy = _inputs(3, 6, 9, 7)
    xb, dyb = x.bfloat16(), dy.bfloat16()
    grad_ref, fisher_ref = _reference(xb.float(), dyb.float())  # exact values of the bf16 inputs
    with backend.forced("torch"):
        grad, fisher = linear_grad_and_fisher(xb, dyb)
    _assert_close(grad, grad_ref)
    _assert_close(fisher, fisher_ref)


def test_shape_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="disagree"):
        linear_grad_and_fisher(torch.zeros(2, 3, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="fisher_acc"):
        linear_grad_and_fisher_(torch.zeros(2, 4), torch.zeros(2, 5), None, torch.zeros(4, 5))


@pytest.mark.interpret
@pytest.mark.parametrize("n,t,i,o", SHAPES)
def test_triton_interpreter_small_blocks(n, t, i, o):
    # 4/8-wide tiles on odd shapes: several tiles, masked edges, T split over blocks.
    x, dy = _inputs(n, t, i, o, seed=3)
    grad_ref, fisher_ref = _reference(x, dy)
    with backend.forced("triton"):
        grad, fisher = linear_grad_and_fisher(x, dy, block_o=8, block_i=4, block_t=4)
    _assert_close(grad, grad_ref)
    _assert_close(fisher, fisher_ref)


@pytest.mark.interpret
def test_triton_interpreter_in_place_bf16_and_strided():
    x, dy = _inputs(3, 7, 10, 6, seed=4)
    xb = x.bfloat16().transpose(0, 1).contiguous().transpose(0, 1)  # strided, bf16
    dyb = dy.bfloat16()
    grad_ref, fisher_ref = _reference(xb.float(), dyb.float())
    grad = torch.ones(6, 10)
    fisher = torch.full((10, 6), 2.0).t()  # strided accumulator [6, 10]
    with backend.forced("triton"):
        linear_grad_and_fisher_(xb, dyb, grad, fisher, block_o=4, block_i=8, block_t=4)
    _assert_close(grad, grad_ref + 1.0)
    _assert_close(fisher, fisher_ref + 2.0)


@pytest.mark.interpret
@pytest.mark.parametrize("groups", [2, 3])
def test_triton_interpreter_samples_split_between_programs(groups):
    # N=5 over 2 or 3 sample groups (the last one partial), atomically added: out of place
    # and on top of existing accumulators.
    x, dy = _inputs(5, 6, 9, 7, seed=5)
    grad_ref, fisher_ref = _reference(x, dy)
    with backend.forced("triton"):
        grad, fisher = linear_grad_and_fisher(x, dy, block_o=8, block_i=8, block_t=4, sample_groups=groups)
        grad_acc, fisher_acc = torch.full((7, 9), 1.0), torch.full((7, 9), 3.0)
        linear_grad_and_fisher_(x, dy, grad_acc, fisher_acc, block_o=8, block_i=8, block_t=4,
                                sample_groups=groups)
    _assert_close(grad, grad_ref)
    _assert_close(fisher, fisher_ref)
    _assert_close(grad_acc, grad_ref + 1.0)
    _assert_close(fisher_acc, fisher_ref + 3.0)


def _reference_with_lengths(x, dy, lengths):
    """float64 reference where sample n is only its first lengths[n] positions."""
    keep = (torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(2)
    return _reference(x * keep, dy * keep)


# Non-zero dy beyond each length: the skipped positions must really be left out, not merely
# contribute zeros. Lengths cover a full row, an empty row, a length past T (clamped) and 1.
LENGTHS = torch.tensor([7, 0, 3, 9, 1])


def test_torch_path_lengths_leave_out_later_positions(monkeypatch):
    import kernels.fisher as fisher_mod

    monkeypatch.setattr(fisher_mod, "TORCH_TILE_BYTES", 1)  # several row tiles as well
    x, dy = _inputs(5, 7, 6, 130, seed=6)
    grad_ref, fisher_ref = _reference_with_lengths(x, dy, LENGTHS.clamp(max=7))
    with backend.forced("torch"):
        grad, fisher = linear_grad_and_fisher(x, dy, lengths=LENGTHS)
        fisher_only = torch.ones(130, 6)
        linear_grad_and_fisher_(x, dy, None, fisher_only, lengths=LENGTHS)
    _assert_close(grad, grad_ref)
    _assert_close(fisher, fisher_ref)
    _assert_close(fisher_only, fisher_ref + 1.0)


def test_torch_path_lengths_with_one_position_per_sample():
    x, dy = _inputs(4, 1, 5, 3, seed=7)
    lengths = torch.tensor([1, 0, 1, 0])
    grad_ref, fisher_ref = _reference_with_lengths(x, dy, lengths)
    with backend.forced("torch"):
        grad, fisher = linear_grad_and_fisher(x, dy, lengths=lengths)
    _assert_close(grad, grad_ref)
    _assert_close(fisher, fisher_ref)


def test_lengths_must_be_one_integer_per_sample():
    x, dy = _inputs(3, 4, 5, 6)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        linear_grad_and_fisher(x, dy, lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer"):
        linear_grad_and_fisher_(x, dy, None, torch.zeros(6, 5), lengths=torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.interpret
@pytest.mark.parametrize("groups", [1, 2])
def test_triton_interpreter_lengths(groups):
    x, dy = _inputs(5, 7, 9, 6, seed=8)
    grad_ref, fisher_ref = _reference_with_lengths(x, dy, LENGTHS.clamp(max=7))
    with backend.forced("triton"):
        grad, fisher = linear_grad_and_fisher(x, dy, block_o=4, block_i=8, block_t=2, sample_groups=groups,
                                              lengths=LENGTHS)
        fisher_acc = torch.full((6, 9), 2.0)
        linear_grad_and_fisher_(x, dy, None, fisher_acc, block_o=8, block_i=4, block_t=4, sample_groups=groups,
                                lengths=LENGTHS.to(torch.int64))
    _assert_close(grad, grad_ref)
    _assert_close(fisher, fisher_ref)
    _assert_close(fisher_acc, fisher_ref + 2.0)
