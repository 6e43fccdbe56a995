"""RecurrentBatchNorm against per-step BatchNorm1d layers; BNLSTMCell / BNLSTM behaviour."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import reference
import torch
from cases import TOLERANCES, assert_close

import batchnorm as bn

T_MAX = 3
STEPS = 5  # steps 3 and 4 run past the last slot


def _per_step_torch_layers(C: int, momentum: float | None, dtype: torch.dtype, w, b):
    """T_MAX independent torch BatchNorm1d layers with the same γ, β as the recurrent one."""
    layers = [torch.nn.BatchNorm1d(C, momentum=momentum, dtype=dtype) for _ in range(T_MAX)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    return layers


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 7)], ids=["NC", "NCL"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_equals_one_batchnorm1d_per_step(dtype, shape, momentum) -> None:
    """Step t behaves as BatchNorm1d number min(t, T-1): outputs, grads, running stats."""
    tol = TOLERANCES[dtype]
    gen = torch.Generator().manual_seed(0)
    C = shape[1]
    ours = bn.RecurrentBatchNorm(C, T_MAX, momentum=momentum, dtype=dtype)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ours.weight.copy_(w)
        ours.bias.copy_(b)
    theirs = _per_step_torch_layers(C, momentum, dtype, w, b)

    # Each step has its own distribution, as the pre-activations of an RNN do.
    xs = [(torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + t) + 3 * t).to(dtype)
          for t in range(STEPS)]
    dys = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(STEPS)]
    rm_ref = [torch.zeros(C, dtype=torch.float64) for _ in range(T_MAX)]
    rv_ref = [torch.ones(C, dtype=torch.float64) for _ in range(T_MAX)]
    tracked = [0] * T_MAX
    for t, (x, dy) in enumerate(zip(xs, dys, strict=True)):
        s = min(t, T_MAX - 1)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ours(x_ours, t)
        y.backward(dy)
        y_t = theirs[s](x_theirs)
        y_t.backward(dy)
        ref = reference.forward(x, w, b, rm_ref[s], rv_ref[s], True, momentum, ours.eps, tracked[s])
        rm_ref[s], rv_ref[s] = ref.running_mean, ref.running_var
        tracked[s] += 1
        assert_close(y, ref.y, tol.atol, tol.rtol, f"step {t} output vs reference")
        assert_close(y, y_t, 2 * tol.atol, 2 * tol.rtol, f"step {t} output vs torch")
        dx_ref, _, _ = reference.backward_train(dy, x, w, ours.eps)
        assert_close(x_ours.grad, dx_ref, tol.grad_atol, tol.grad_rtol, f"step {t} dx vs reference")
        assert_close(
            x_ours.grad, x_theirs.grad, 2 * tol.grad_atol, 2 * tol.grad_rtol, f"dx {t}"
        )

    # Shared γ/β: their gradient is the sum over the per-step layers' gradients.
    scale = max(1.0, (STEPS * shape[0] * (shape[2] if len(shape) == 3 else 1)) ** 0.5)
    dw = sum(layer.weight.grad for layer in theirs)
    db = sum(layer.bias.grad for layer in theirs)
    assert_close(ours.weight.grad, dw, tol.grad_atol * scale, tol.grad_rtol, "dweight")
    assert_close(ours.bias.grad, db, tol.grad_atol * scale, tol.grad_rtol, "dbias")
    for s in range(T_MAX):
        assert_close(ours.running_mean[s], rm_ref[s], tol.atol, tol.rtol, f"running_mean[{s}]")
        assert_close(ours.running_var[s], rv_ref[s], tol.atol, tol.rtol, f"running_var[{s}]")
        assert_close(
            ours.running_var[s], theirs[s].running_var, 2 * tol.atol, 2 * tol.rtol, f"rv[{s}]"
        )
    assert ours.num_batches_tracked.tolist() == [1, 1, STEPS - T_MAX + 1] == tracked
    assert ours.num_batches_skipped.tolist() == [0] * T_MAX

    # Eval: step t normalizes with slot min(t, T-1)'s running statistics.
    ours.eval()
    for layer in theirs:
        layer.eval()
    probe = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    for t in range(STEPS + 2):
        expected = theirs[min(t, T_MAX - 1)](probe)
        assert_close(ours(probe, t), expected, 2 * tol.atol, 2 * tol.rtol, f"eval step {t}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_input_float32_statistics(dtype) -> None:
    tol = TOLERANCES[dtype]
    layer = bn.RecurrentBatchNorm(5, 2)
    x = (torch.randn(16, 5, dtype=torch.float64) * 3 + 10).to(dtype)
    y = layer(x, 1)
    assert y.dtype == dtype and layer.running_mean.dtype == torch.float32
    ref = reference.forward(x, None, None, torch.zeros(5), torch.ones(5), True, 0.1, layer.eps)
    assert_close(y, ref.y, tol.atol, tol.rtol, "output")
    assert_close(layer.running_mean[1], ref.running_mean, 1e-5, 1e-5, "running_mean (float32)")
    assert_close(layer.running_var[1], ref.running_var, 1e-4, 1e-4, "running_var (float32)")
    assert torch.equal(layer.running_mean[0], torch.zeros(5)), "other slots untouched"


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=["bool", "float"])
def test_padded_rows_stay_out_of_the_statistics(mask_dtype) -> None:
    """Masked BN equals BatchNorm1d over the real rows; padded rows give 0 and no gradient."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64) * 2 + 1
    real = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    x[~real] = float("nan")  # padding may hold anything
    dy = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    ours = bn.RecurrentBatchNorm(4, 2, dtype=torch.float64)
    theirs = torch.nn.BatchNorm1d(4, dtype=torch.float64)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.uniform_(0.5, 1.5, generator=gen)
            layer.bias.normal_(generator=gen)
        theirs.weight.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)

    x_ours = x.clone().requires_grad_()
    y = ours(x_ours, 1, mask=real.to(mask_dtype))
    y.backward(dy)
    x_theirs = x[real].clone().requires_grad_()
    y_t = theirs(x_theirs)
    y_t.backward(dy[real])

    assert_close(y[real], y_t, 1e-12, 1e-10, "real rows")
    assert torch.equal(y[~real], torch.zeros_like(y[~real])), "padded rows output 0"
    assert_close(x_ours.grad[real], x_theirs.grad, 1e-12, 1e-10, "dx of real rows")
    assert torch.equal(x_ours.grad[~real], torch.zeros_like(x_ours.grad[~real])), "dx of padding"
    assert_close(ours.weight.grad, theirs.weight.grad, 1e-12, 1e-10, "dweight")
    assert_close(ours.bias.grad, theirs.bias.grad, 1e-12, 1e-10, "dbias")
    assert_close(ours.running_mean[1], theirs.running_mean, 1e-12, 1e-10, "running_mean")
    assert_close(ours.running_var[1], theirs.running_var, 1e-12, 1e-10, "running_var")
    assert ours.num_batches_tracked.tolist() == [0, 1]

    # Eval: real rows use the slot's running statistics, padded rows still give 0.
    ours.eval()
    theirs.eval()
    y_eval = ours(x, 1, mask=real.to(mask_dtype))
    assert_close(y_eval[real], theirs(x[real]), 1e-12, 1e-10, "eval real rows")
    assert torch.equal(y_eval[~real], torch.zeros_like(y_eval[~real]))


def test_mask_edge_cases() -> None:
    x = torch.randn(6, 3)
    layer = bn.RecurrentBatchNorm(3, 2)
    # Every row real: the same as no mask.
    assert_close(layer(x, 0, torch.ones(6, dtype=torch.bool)), layer(x, 0), 0, 0, "all real")
    # No real row: zeros, nothing updated.
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x, 1, torch.zeros(6, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(x))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    # One real row cannot be normalized with batch statistics.
    one = torch.zeros(6, dtype=torch.bool)
    one[2] = True
    with pytest.raises(ValueError, match=r"time step t=1 has 1 real \(unmasked\) row"):
        layer(x, 1, one)
    layer.eval()
    assert layer(x, 1, one).shape == x.shape  # eval handles it


def test_forward_sequence_equals_step_loop() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, 3, generator=gen)
    mask = torch.rand(6, 5, generator=gen) > 0.3
    mask[:, :2] = True  # at least two real rows per step
    a, b = bn.RecurrentBatchNorm(3, 4), bn.RecurrentBatchNorm(3, 4)
    y_seq = a.forward_sequence(x, mask)
    y_loop = torch.stack([b(x[t], t, mask[t]) for t in range(6)])
    assert_close(y_seq, y_loop, 0, 0, "forward_sequence")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    # A later chunk of a long sequence starts at its own step.
    later = torch.stack([b(x[0], 4), b(x[1], 5)])
    assert_close(a.forward_sequence(x[:2], start=4), later, 0, 0, "start")


def test_gradcheck_float64() -> None:
    """Gradients of x, γ and β through masked steps, and second derivatives."""
    gen = torch.Generator().manual_seed(5)
    layer = bn.RecurrentBatchNorm(3, 2, dtype=torch.float64, track_running_stats=False)
    x = torch.randn(4, 7, 3, generator=gen, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 1, 1, 0, 1]] * 4, dtype=torch.bool)
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()

    def sequence(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        params = {"weight": w, "bias": b}
        call = torch.func.functional_call
        return torch.stack([call(layer, params, (x[t], t, mask[t])) for t in range(x.shape[0])])

    assert torch.autograd.gradcheck(sequence, (x, w, b))
    assert torch.autograd.gradgradcheck(sequence, (x, w, b))


def test_non_finite_step_is_skipped_in_its_own_slot() -> None:
    layer = bn.RecurrentBatchNorm(3, 3)
    layer(torch.randn(4, 3), 0)
    bad = torch.randn(4, 3)
    bad[1, 2] = float("inf")
    layer(bad, 1)
    assert layer.num_batches_tracked.tolist() == [1, 0, 0]
    assert layer.num_batches_skipped.tolist() == [0, 1, 0]
    assert torch.equal(layer.running_mean[1], torch.zeros(3))
    with pytest.raises(FloatingPointError):
        bn.RecurrentBatchNorm(3, 3, check_finite=True)(bad, 0)


def test_time_index_forms() -> None:
    layer = bn.RecurrentBatchNorm(2, 4)
    x = torch.randn(3, 2)
    layer(x, torch.tensor(2))
    layer(x, np.int64(3))
    layer(x, 7)  # past the end: the last slot
    assert layer.num_batches_tracked.tolist() == [0, 0, 1, 2]
    assert layer.slot(10) == 3 and layer.slot(1) == 1


@pytest.mark.parametrize(
    ("t", "mask", "match"),
    [
        (-1, None, r"t must be >= 0, got -1"),
        (1.0, None, r"t must be an int or a 0-dim integer tensor, got float 1.0"),
        (True, None, r"t must be an int, got bool"),
        (torch.tensor([1]), None, r"0-dim integer tensor, got a tensor of shape \(1,\)"),
        (torch.tensor(1.0), None, r"got a tensor of shape \(\) and dtype torch.float32"),
        ("0", None, r"got str '0'"),
        (0, torch.ones(4, dtype=torch.bool), r"mask must have shape \(N,\) = \(3,\) .* got \(4,\)"),
        (0, torch.ones(3, 1, dtype=torch.bool), r"mask must have shape \(N,\).*got \(3, 1"),
        (0, torch.ones(3, dtype=torch.long), r"mask must be bool or floating point .* torch.int64"),
        (0, torch.tensor([1.0, 0.5, 1.0]), r"only 0 \(padded\) and 1 \(real\).*\[0.5, 1"),
        (0, [1, 1, 1], r"mask must be a bool or floating-point tensor of shape \(3,\), got list"),
    ],
)
def test_errors_name_expected_and_got(t, mask, match) -> None:
    with pytest.raises(ValueError, match=match):
        bn.RecurrentBatchNorm(2, 4)(torch.randn(3, 2), t, mask)


def test_shape_and_constructor_errors() -> None:
    layer = bn.RecurrentBatchNorm(2, 4)
    with pytest.raises(ValueError, match=r"2D \(N, C\) or 3D \(N, C, L\), got 4D"):
        layer(torch.randn(3, 2, 1, 1), 0)
    with pytest.raises(ValueError, match=r"expected input with 2 channels .* got 5"):
        layer(torch.randn(3, 5), 0)
    with pytest.raises(ValueError, match=r"mask must have shape \(T, N\) = \(4, 3\).*got \(3, 4\)"):
        layer.forward_sequence(torch.randn(4, 3, 2), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_timesteps must be a positive int, got 0"):
        bn.RecurrentBatchNorm(2, 0)
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 2, dtype=torch.long), 0)


def test_state_and_repr() -> None:
    layer = bn.RecurrentBatchNorm(4, 6, weight_init=0.1, bias=False)
    state = layer.state_dict()
    assert list(state) == ["weight", "running_mean", "running_var", "num_batches_tracked"]
    assert state["running_mean"].shape == (6, 4) and state["num_batches_tracked"].shape == (6,)
    assert torch.equal(layer.weight, torch.full((4,), 0.1))
    assert "max_timesteps=6" in repr(layer) and "bias=False" in repr(layer)
    layer(torch.randn(5, 4), 2)
    other = bn.RecurrentBatchNorm(4, 6, weight_init=0.1, bias=False)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.running_var, layer.running_var)
    layer.reset_running_stats()
    assert int(layer.num_batches_tracked.sum()) == 0
    assert torch.equal(layer.running_var, torch.ones(6, 4))


# ---------------------------------------------------------------------------------------
# BN-LSTM
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_cell_follows_the_paper_equations(bias: bool) -> None:
    """One training step of the cell, recomputed with torch's batch_norm per term."""
    torch.manual_seed(6)
    cell = bn.BNLSTMCell(3, 4, max_timesteps=5, dtype=torch.float64, bias=bias)
    with torch.no_grad():
        for norm in (cell.bn_ih, cell.bn_hh, cell.bn_c):
            norm.weight.uniform_(0.5, 1.5)
        cell.bn_c.bias.normal_()
    x = torch.randn(6, 3, dtype=torch.float64)
    h = torch.randn(6, 4, dtype=torch.float64)
    c = torch.randn(6, 4, dtype=torch.float64)
    h1, c1 = cell(x, (h, c), t=2)

    tf = torch.nn.functional
    wx = tf.batch_norm(x @ cell.weight_ih.T, None, None, cell.bn_ih.weight, None, training=True)
    wh = tf.batch_norm(h @ cell.weight_hh.T, None, None, cell.bn_hh.weight, None, training=True)
    b = cell.bias if bias else 0.0  # bias=False: no b in the gates
    assert (cell.bias is None) == (not bias)
    i, f, g, o = (wx + wh + b).chunk(4, 1)  # torch.nn.LSTM's gate order
    c_ref = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_ref = torch.sigmoid(o) * torch.tanh(
        tf.batch_norm(c_ref, None, None, cell.bn_c.weight, cell.bn_c.bias, training=True)
    )
    assert_close(c1, c_ref, 1e-12, 1e-10, "c_t")
    assert_close(h1, h_ref, 1e-12, 1e-10, "h_t")
    for norm in (cell.bn_ih, cell.bn_hh, cell.bn_c):
        assert norm.num_batches_tracked.tolist() == [0, 0, 1, 0, 0]


def test_gamma_init_and_parameters() -> None:
    lstm = bn.BNLSTM(3, 8, num_layers=2, max_timesteps=4)
    reference_lstm = torch.nn.LSTM(3, 8, num_layers=2)
    for layer, cell in enumerate(lstm.cells):
        for norm in (cell.bn_ih, cell.bn_hh, cell.bn_c):
            assert torch.equal(norm.weight, torch.full_like(norm.weight, 0.1))
            assert norm.running_mean.shape[0] == 4
        assert cell.bn_ih.bias is None and cell.bn_hh.bias is None  # β_x = β_h = 0
        assert torch.equal(cell.bn_c.bias, torch.zeros(8))
        assert cell.weight_ih.shape == getattr(reference_lstm, f"weight_ih_l{layer}").shape
        assert cell.weight_hh.shape == getattr(reference_lstm, f"weight_hh_l{layer}").shape
        assert torch.equal(cell.bias[8:16], torch.ones(8))  # forget gate


@pytest.mark.parametrize("batch_first", [False, True])
def test_shapes_follow_torch_lstm(batch_first: bool) -> None:
    T, N, D, H, L = 7, 5, 3, 6, 2  # D: input size
    ours = bn.BNLSTM(D, H, num_layers=L, batch_first=batch_first, max_timesteps=4, dropout=0.2)
    theirs = torch.nn.LSTM(D, H, num_layers=L, batch_first=batch_first)
    x = torch.randn((N, T, D) if batch_first else (T, N, D))
    h0, c0 = torch.randn(L, N, H), torch.randn(L, N, H)
    out, (h, c) = ours(x, (h0, c0))
    out_t, (h_t, c_t) = theirs(x, (h0, c0))
    assert out.shape == out_t.shape and h.shape == h_t.shape and c.shape == c_t.shape
    assert_close(out[-1] if not batch_first else out[:, -1], h[-1], 0, 0, "last output is h_n")
    out.sum().backward()
    assert all(p.grad is not None for p in ours.parameters())


def test_layer_equals_cell_loop() -> None:
    """The whole-sequence input projection gives what stepping the cell gives."""
    torch.manual_seed(7)
    lstm = bn.BNLSTM(3, 5, max_timesteps=4, dtype=torch.float64)
    cell = bn.BNLSTMCell(3, 5, max_timesteps=4, dtype=torch.float64)
    cell.load_state_dict(lstm.cells[0].state_dict())
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    out, (_, c_n) = lstm(x)
    state = None
    for t in range(6):
        state = cell(x[t], state, t=t)
        assert_close(out[t], state[0], 1e-12, 1e-10, f"h at step {t}")
    assert_close(c_n[0], state[1], 1e-12, 1e-10, "c_n")
    for key, value in cell.state_dict().items():
        assert_close(value, lstm.cells[0].state_dict()[key], 1e-12, 1e-10, key)


def test_padded_steps_leave_state_unchanged() -> None:
    torch.manual_seed(8)
    T, N, D, H = 5, 4, 3, 6
    lstm = bn.BNLSTM(D, H, num_layers=2, max_timesteps=T)
    lengths = torch.tensor([5, 3, 5, 3])  # every step keeps two real sequences
    x = torch.randn(T, N, D)
    h0, c0 = torch.randn(2, N, H), torch.randn(2, N, H)
    out, (h_n, c_n) = lstm(x, (h0, c0), lengths=lengths)
    for n, length in enumerate(lengths.tolist()):
        assert_close(h_n[-1, n], out[length - 1, n], 0, 0, f"h_n of sequence {n}")
        assert torch.equal(out[length:, n], torch.zeros_like(out[length:, n])), "padded output"
    # Padding may hold anything: the results do not depend on it.
    fresh = bn.BNLSTM(D, H, num_layers=2, max_timesteps=T)
    fresh.load_state_dict(lstm.state_dict())
    for cell in fresh.cells:
        for norm in (cell.bn_ih, cell.bn_hh, cell.bn_c):
            norm.reset_running_stats()
    x_nan = x.clone()
    x_nan[3:, 1] = float("nan")
    x_nan[3:, 3] = 1e6
    mask = torch.arange(T)[:, None] < lengths[None, :]
    out2, (h2, c2) = fresh(x_nan.requires_grad_(), (h0, c0), mask=mask)
    assert_close(out2, out, 0, 0, "output with garbage padding")
    assert_close(h2, h_n, 0, 0, "h_n")
    assert_close(c2, c_n, 0, 0, "c_n")
    out2.sum().backward()
    assert torch.isfinite(x_nan.grad).all() and torch.equal(x_nan.grad[3:, 1], torch.zeros(2, D))
    # Every step's statistics were updated once, from the real sequences only.
    for cell in fresh.cells:
        assert cell.bn_c.num_batches_tracked.tolist() == [1] * T
        assert cell.bn_c.num_batches_skipped.tolist() == [0] * T
    # A sequence of length 0 keeps its initial state.
    _, (h_z, c_z) = lstm(x, (h0, c0), lengths=[5, 0, 5, 3])
    assert torch.equal(h_z[:, 1], h0[:, 1]) and torch.equal(c_z[:, 1], c0[:, 1])


def test_eval_with_one_sequence() -> None:
    torch.manual_seed(9)
    lstm = bn.BNLSTM(2, 4, max_timesteps=6)
    for _ in range(3):
        lstm(torch.randn(6, 8, 2))
    lstm.eval()
    x = torch.randn(9, 1, 2)  # longer than max_timesteps, batch of one
    out, _ = lstm(x)
    assert out.shape == (9, 1, 4) and torch.isfinite(out).all()
    assert_close(lstm(x)[0], out, 0, 0, "eval is deterministic")
    with pytest.raises(ValueError, match="BNLSTM: a training batch of 1 sequence"):
        lstm.train()(x)  # training needs a batch


def test_learns_sequence_sum() -> None:
    """40 Adam steps cut the error of predicting a sequence's sum by more than 5x."""
    torch.manual_seed(10)
    T = 6
    lstm = bn.BNLSTM(1, 8, max_timesteps=T)
    head = torch.nn.Linear(8, 1)
    opt = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=3e-2)
    gen = torch.Generator().manual_seed(11)
    x_test = torch.rand(T, 128, 1, generator=gen) * 2 - 1

    def test_loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(head(lstm(x_test)[0][-1]), x_test.sum(0)).item()

    before = test_loss()
    for _ in range(40):
        x = torch.rand(T, 32, 1, generator=gen) * 2 - 1
        loss = torch.nn.functional.mse_loss(head(lstm(x)[0][-1]), x.sum(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = test_loss()
    assert after < 0.2 * before, f"training-mode loss went from {before:.3f} to {after:.3f}"
    # Eval mode with per-step population statistics, once they caught up with the
    # final weights (the EMA lags while the weights move fast).
    with torch.no_grad():
        for _ in range(20):
            lstm(torch.rand(T, 128, 1, generator=gen) * 2 - 1)
    lstm.eval()
    assert test_loss() < 0.2 * before, f"eval loss {test_loss():.3f} vs initial {before:.3f}"


def test_bnlstm_errors() -> None:
    lstm = bn.BNLSTM(2, 3, max_timesteps=4)
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="lengths or mask, not both"):
        lstm(x, lengths=[4, 4, 4], mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 4\].*got \[4, 5, 4\]"):
        lstm(x, lengths=[4, 5, 4])
    with pytest.raises(ValueError, match=r"lengths must be 3 integers.*got \(2,\)"):
        lstm(x, lengths=[4, 4])
    with pytest.raises(ValueError, match=r"mask must have shape \(T, N\) = \(4, 3\), got \(3, 4\)"):
        lstm(x, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"h_0 must have shape .* = \(1, 3, 3\), got \(3, 3\)"):
        lstm(x, (torch.zeros(3, 3), torch.zeros(3, 3)))
    unbatched = r"\(T, input_size=2\) unbatched"
    with pytest.raises(
        ValueError, match=rf"input of shape \(T, N, input_size=2\), or {unbatched}, got \(4, 3\)"
    ):
        lstm(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"input of shape \(N, input_size=2\), got \(3, 5\)"):
        lstm.cells[0](torch.randn(3, 5), t=0)


def _statistics(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_" in k}


def test_failed_sequence_leaves_every_slot_unchanged() -> None:
    """A step that raises after earlier steps ran: no slot keeps an update of the failed call."""
    lstm = bn.BNLSTM(2, 3, max_timesteps=4)
    before = _statistics(lstm)
    # Sorted lengths where only one sequence reaches steps 1 and 2.
    with pytest.raises(ValueError, match=r"BNLSTM: time step t=1 has 1 real \(unpadded\) sequence"):
        lstm(torch.randn(3, 2, 2), lengths=[3, 1])
    assert all(torch.equal(v, before[k]) for k, v in _statistics(lstm).items())
    with pytest.raises(ValueError, match="BNLSTM: a training batch of 1 sequence"):
        lstm(torch.randn(3, 1, 2))

    norm = bn.RecurrentBatchNorm(3, max_timesteps=4, check_finite=True)
    x = torch.randn(3, 4, 3)
    x[2, 0, 1] = float("nan")  # step 2 is non-finite: steps 0 and 1 ran already
    before = _statistics(norm)
    with pytest.raises(FloatingPointError):
        norm.forward_sequence(x)
    assert all(torch.equal(v, before[k]) for k, v in _statistics(norm).items())
    norm.forward_sequence(x[:2])  # a call that succeeds still updates its slots
    assert norm.num_batches_tracked.tolist() == [1, 1, 0, 0]


# ---------------------------------------------------------------------------------------
# BN-LSTM: torch.nn.LSTM's interface
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [(3, 4), (3, 4, 2), (3, 4, 2, False), (3, 4, 1, True, True), (3, 4, 2, True, False, 0.5)],
    ids=["I_H", "layers", "bias", "batch_first", "dropout"],
)
def test_positional_arguments_follow_torch_lstm(args: tuple) -> None:
    """BNLSTM(*args) reads its positional arguments as torch.nn.LSTM(*args) does."""
    ours = bn.BNLSTM(*args, max_timesteps=3)
    theirs = torch.nn.LSTM(*args)
    for what in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        assert getattr(ours, what) == getattr(theirs, what), what
    assert all((cell.bias is not None) == theirs.bias for cell in ours.cells)


def test_bias_false_drops_the_gate_bias() -> None:
    """bias=False is bias=True with b = 0, and the bias=True state_dict is unchanged."""
    torch.manual_seed(12)
    with_bias = bn.BNLSTM(3, 4, 2, max_timesteps=3, dtype=torch.float64)
    assert list(with_bias.state_dict())[:16] == [
        "cells.0.weight_ih", "cells.0.weight_hh", "cells.0.bias",
        "cells.0.bn_ih.weight", "cells.0.bn_ih.running_mean", "cells.0.bn_ih.running_var",
        "cells.0.bn_ih.num_batches_tracked",
        "cells.0.bn_hh.weight", "cells.0.bn_hh.running_mean", "cells.0.bn_hh.running_var",
        "cells.0.bn_hh.num_batches_tracked",
        "cells.0.bn_c.weight", "cells.0.bn_c.bias", "cells.0.bn_c.running_mean",
        "cells.0.bn_c.running_var", "cells.0.bn_c.num_batches_tracked",
    ]
    no_bias = bn.BNLSTM(3, 4, 2, False, max_timesteps=3, dtype=torch.float64)
    state = with_bias.state_dict()
    assert list(no_bias.state_dict()) == [
        k for k in state if k not in ("cells.0.bias", "cells.1.bias")
    ]
    assert all(cell.bias is None for cell in no_bias.cells) and "bias=False" in repr(no_bias)
    no_bias.load_state_dict({k: v for k, v in state.items() if k in no_bias.state_dict()})
    with torch.no_grad():
        for cell in with_bias.cells:
            cell.bias.zero_()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    out, (h, c) = no_bias(x)
    out_ref, (h_ref, c_ref) = with_bias(x)
    assert_close(out, out_ref, 0, 0, "output")
    assert_close(h, h_ref, 0, 0, "h_n")
    assert_close(c, c_ref, 0, 0, "c_n")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bidirectional": True}, r"BNLSTM: bidirectional=True is not supported"),
        ({"proj_size": 2}, r"BNLSTM: proj_size=2 is not supported"),
        ({"max_timesteps": 0}, r"BNLSTM: max_timesteps must be a positive int, got 0"),
        ({"num_layers": 0}, r"BNLSTM: num_layers must be a positive int, got 0"),
        ({"hidden_size": 0}, r"BNLSTM: hidden_size must be a positive int, got 0"),
        ({"momentum": 2.0}, r"BNLSTM: momentum must be in \[0, 1\] or None, got 2.0"),
        ({"dropout": 1.5}, r"BNLSTM: dropout must be in \[0, 1\], got 1.5"),
    ],
)
def test_bnlstm_constructor_errors(kwargs, match) -> None:
    args = {"input_size": 3, "hidden_size": 4, "max_timesteps": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        bn.BNLSTM(**args)


def test_cell_constructor_errors_name_the_cell() -> None:
    with pytest.raises(ValueError, match="BNLSTMCell: max_timesteps must be a positive int, got 0"):
        bn.BNLSTMCell(3, 4, 0)
    with pytest.raises(ValueError, match=r"BNLSTMCell: eps must be >= 0"):
        bn.BNLSTMCell(3, 4, 2, eps=-1.0)


def test_dropout_with_one_layer_warns_as_torch() -> None:
    with pytest.warns(UserWarning, match="dropout=0.5 and num_layers=1"):
        torch.nn.LSTM(3, 4, dropout=0.5)
    with pytest.warns(UserWarning, match=r"BNLSTM: .*dropout=0.5 and num_layers=1"):
        bn.BNLSTM(3, 4, dropout=0.5, max_timesteps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn.BNLSTM(3, 4, 2, dropout=0.5, max_timesteps=3)
        bn.BNLSTM(3, 4, max_timesteps=3)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True], ids=["zeros", "hx"])
def test_unbatched_input_is_a_batch_of_one(batch_first: bool, with_hx: bool) -> None:
    """(T, I) input and (L, H) states, as torch.nn.LSTM takes them; eval mode."""
    torch.manual_seed(13)
    T, D, H, L = 7, 3, 4, 2
    lstm = bn.BNLSTM(D, H, L, batch_first=batch_first, max_timesteps=4, dtype=torch.float64)
    lstm(torch.randn(T, 6, D, dtype=torch.float64))  # some running statistics
    lstm.eval()
    x = torch.randn(T, D, dtype=torch.float64)
    hx = (torch.randn(L, H, dtype=torch.float64), torch.randn(L, H, dtype=torch.float64))
    out, (h, c) = lstm(x, hx if with_hx else None)
    out_t, (h_t, c_t) = torch.nn.LSTM(D, H, L, batch_first=batch_first).double()(
        x, hx if with_hx else None
    )
    assert out.shape == out_t.shape == (T, H)
    assert h.shape == h_t.shape == c.shape == c_t.shape == (L, H)
    batch = x.unsqueeze(0 if batch_first else 1)
    hx_batch = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if with_hx else None
    out_b, (h_b, c_b) = lstm(batch, hx_batch)
    assert_close(out, out_b.squeeze(0 if batch_first else 1), 0, 0, "output")
    assert_close(h, h_b.squeeze(1), 0, 0, "h_n")
    assert_close(c, c_b.squeeze(1), 0, 0, "c_n")


def test_unbatched_input_errors() -> None:
    lstm = bn.BNLSTM(3, 4, 2, max_timesteps=4)
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"BNLSTM: unbatched input .* training batch of 1 seq"):
        lstm(x)  # training: one row per step
    lstm.eval()
    with pytest.raises(ValueError, match=r"h_0 must have shape \(num_layers, hidden_size\) = "
                                         r"\(2, 4\) for unbatched input, got \(2, 1, 4\)"):
        lstm(x, (torch.zeros(2, 1, 4), torch.zeros(2, 1, 4)))
    with pytest.raises(ValueError, match="lengths and mask need batched input"):
        lstm(x, lengths=[5])


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_sequence_equals_padded_with_lengths(enforce_sorted, batch_first) -> None:
    """A PackedSequence gives what the padded batch with its lengths gives: the output
    packed as the input, h_n/c_n in the caller's order, the same statistics and grads."""
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(14)
    T, D, H, L = 6, 3, 5, 2
    lengths = [6, 6, 6, 4, 4] if enforce_sorted else [6, 6, 4, 6, 4]
    N = len(lengths)
    packed_lstm = bn.BNLSTM(D, H, L, batch_first=batch_first, max_timesteps=4,
                            dtype=torch.float64)
    padded_lstm = bn.BNLSTM(D, H, L, batch_first=batch_first, max_timesteps=4,
                            dtype=torch.float64)
    padded_lstm.load_state_dict(packed_lstm.state_dict())
    x = torch.randn(T, N, D, dtype=torch.float64)  # time-major; batch_first only for padded
    hx = (torch.randn(L, N, H, dtype=torch.float64), torch.randn(L, N, H, dtype=torch.float64))
    for mode in ("train", "eval"):
        getattr(packed_lstm, mode)()
        getattr(padded_lstm, mode)()
        x_packed = x.clone().requires_grad_()
        packed = pack_padded_sequence(x_packed, lengths, enforce_sorted=enforce_sorted)
        out, (h, c) = packed_lstm(packed, hx)
        x_padded = x.clone().requires_grad_()
        out_ref, (h_ref, c_ref) = padded_lstm(
            x_padded.transpose(0, 1) if batch_first else x_padded, hx, lengths=lengths
        )
        out_ref = out_ref.transpose(0, 1) if batch_first else out_ref
        assert isinstance(out, PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        for what in ("sorted_indices", "unsorted_indices"):
            ours, theirs = getattr(out, what), getattr(packed, what)
            assert (ours is None and theirs is None) or torch.equal(ours, theirs), what
        expected = pack_padded_sequence(out_ref, lengths, enforce_sorted=enforce_sorted)
        assert_close(out.data, expected.data, 1e-12, 1e-10, f"{mode} packed output")
        unpacked, unpacked_lengths = pad_packed_sequence(out)
        assert unpacked_lengths.tolist() == lengths
        assert_close(unpacked, out_ref, 1e-12, 1e-10, f"{mode} unpacked output")
        assert_close(h, h_ref, 1e-12, 1e-10, f"{mode} h_n (caller's order)")
        assert_close(c, c_ref, 1e-12, 1e-10, f"{mode} c_n (caller's order)")
        (out.data.sum() + h.sum()).backward()
        (expected.data.sum() + h_ref.sum()).backward()
        assert_close(x_packed.grad, x_padded.grad, 1e-12, 1e-10, f"{mode} input gradient")
    for key, value in packed_lstm.state_dict().items():
        assert_close(value, padded_lstm.state_dict()[key], 1e-12, 1e-10, key)
    with pytest.raises(ValueError, match="a PackedSequence carries its own lengths"):
        packed_lstm(pack_padded_sequence(x, lengths, enforce_sorted=False), lengths=lengths)


def test_packed_sequence_shapes_follow_torch_lstm() -> None:
    from torch.nn.utils.rnn import pack_padded_sequence

    packed = pack_padded_sequence(torch.randn(5, 3, 2), [3, 5, 4], enforce_sorted=False)
    out, (h, c) = bn.BNLSTM(2, 4, 2, max_timesteps=5).eval()(packed)
    out_t, (h_t, c_t) = torch.nn.LSTM(2, 4, 2)(packed)
    assert out.data.shape == out_t.data.shape and torch.equal(out.batch_sizes, out_t.batch_sizes)
    assert h.shape == h_t.shape and c.shape == c_t.shape


def test_reset_parameters_and_flatten_parameters() -> None:
    torch.manual_seed(15)
    lstm = bn.BNLSTM(3, 4, 2, max_timesteps=3)
    fresh = {k: v.clone() for k, v in lstm.state_dict().items()}
    lstm(torch.randn(4, 5, 3))
    with torch.no_grad():
        for p in lstm.parameters():
            p.add_(1.0)
    lstm.reset_parameters()
    for key, value in lstm.state_dict().items():
        if "weight_ih" in key or "weight_hh" in key:
            # New draws of torch's uniform ±1/sqrt(H) initialization.
            assert not torch.equal(value, fresh[key]) and float(value.abs().max()) <= 0.5, key
        else:
            assert torch.equal(value, fresh[key]), key  # bias, γ, β and statistics
    before = {k: v.clone() for k, v in lstm.state_dict().items()}
    assert lstm.flatten_parameters() is None  # torch code calls it; nothing to pack
    assert all(torch.equal(v, before[k]) for k, v in lstm.state_dict().items())
    bn.BNLSTM(3, 4, bias=False, max_timesteps=3).reset_parameters()


@pytest.mark.parametrize("value", [0.5, float("nan"), 2.0])
def test_bnlstm_float_mask_must_hold_0_and_1(value: float) -> None:
    """As BNLSTMCell and RecurrentBatchNorm: a 0/1 float mask equals the bool mask, and
    any other value is refused in training."""
    torch.manual_seed(16)
    lstm = bn.BNLSTM(3, 4, max_timesteps=3, dtype=torch.float64)
    other = bn.BNLSTM(3, 4, max_timesteps=3, dtype=torch.float64)
    other.load_state_dict(lstm.state_dict())
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    real = torch.ones(5, 4, dtype=torch.bool)
    real[3:, 1] = False
    out_float, _ = lstm(x, mask=real.to(torch.float64))
    out_bool, _ = other(x, mask=real)
    assert_close(out_float, out_bool, 0, 0, "0/1 float mask")
    bad = real.to(torch.float64)
    bad[3:, 1] = value
    before = _statistics(lstm)
    with pytest.raises(ValueError, match=r"BNLSTM: a floating-point mask must hold only 0"):
        lstm(x, mask=bad)
    assert all(torch.equal(v, before[k]) for k, v in _statistics(lstm).items())
    cell = bn.BNLSTMCell(3, 4, 3)
    with pytest.raises(ValueError, match=r"BNLSTMCell: a floating-point mask must hold only 0"):
        cell(x[0].float(), t=0, mask=bad[3])


@pytest.mark.parametrize(
    ("shape", "t", "mask", "match"),
    [
        ((1, 3), 0, None, r"BNLSTMCell: time step t=0 has 1 row in input of shape \(1, 3\) in tr"),
        ((4, 3), 2, torch.tensor([0, 1, 0, 0], dtype=torch.bool),
         r"BNLSTMCell: time step t=2 has 1 real \(unmasked\) row in input of shape \(4, 3\)"),
        ((4, 3), -1, None, r"BNLSTMCell: time index t must be >= 0, got -1"),
        ((4, 3), 1.0, None, r"BNLSTMCell: time index t must be an int"),
        ((4, 3), 0, torch.ones(3, dtype=torch.bool),
         r"BNLSTMCell: mask must have shape \(N,\) = \(4,\) to match input \(4, 3\), got \(3,\)"),
        ((4, 3), 0, torch.ones(4, dtype=torch.long),
         r"BNLSTMCell: mask must be bool or floating point .* torch.int64"),
    ],
    ids=["one_row", "one_real_row", "negative_t", "float_t", "mask_shape", "mask_dtype"],
)
def test_cell_errors_name_the_cell_and_the_input(shape, t, mask, match) -> None:
    cell = bn.BNLSTMCell(3, 4, max_timesteps=3)
    before = _statistics(cell)
    with pytest.raises(ValueError, match=match):
        cell(torch.randn(shape), t=t, mask=mask)
    assert all(torch.equal(v, before[k]) for k, v in _statistics(cell).items())


def test_cell_one_real_row_runs_in_eval() -> None:
    cell = bn.BNLSTMCell(3, 4, max_timesteps=3).eval()
    h, c = cell(torch.randn(4, 3), t=0, mask=torch.tensor([0, 1, 0, 0], dtype=torch.bool))
    assert h.shape == c.shape == (4, 4) and torch.isfinite(h).all()
    h1, _ = cell(torch.randn(1, 3), t=0)
    assert h1.shape == (1, 4)


F64 = torch.float64


@pytest.mark.parametrize(
    ("make_call", "match"),
    [
        (lambda m: m(torch.randn(4, 3, 2, dtype=F64)),
         r"BNLSTM: input dtype torch.float64 does not match weight dtype torch.float32"),
        (lambda m: m(torch.randn(4, 3, 2), (torch.zeros(1, 3, 3, dtype=F64), torch.zeros(1, 3, 3))),
         r"BNLSTM: h_0 dtype torch.float64 does not match weight dtype torch.float32"),
        (lambda m: m(torch.randn(4, 3, 2), (torch.zeros(1, 3, 3), torch.zeros(1, 3, 3, dtype=F64))),
         r"BNLSTM: c_0 dtype torch.float64 does not match weight dtype torch.float32"),
        (lambda m: m.cells[0](torch.randn(3, 2, dtype=F64), t=0),
         r"BNLSTMCell: input dtype torch.float64 does not match weight dtype torch.float32"),
        (lambda m: m.cells[0](torch.randn(3, 2), (torch.zeros(3, 3, dtype=F64),
                                                  torch.zeros(3, 3)), t=0),
         r"BNLSTMCell: h dtype torch.float64 does not match weight dtype torch.float32"),
    ],
    ids=["input", "h_0", "c_0", "cell_input", "cell_h"],
)
def test_dtype_mismatch_is_a_clear_error(make_call, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_call(bn.BNLSTM(2, 3, max_timesteps=4))


def test_one_real_row_message_in_eval_without_running_statistics() -> None:
    """Eval without running statistics uses batch statistics: the error says so."""
    layer = bn.RecurrentBatchNorm(3, 2, track_running_stats=False).eval()
    one = torch.tensor([1.0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"in eval mode without running statistics "
                                         r"\(track_running_stats=False\)") as caught:
        layer(torch.randn(4, 3), 0, one)
    assert "use eval mode" not in str(caught.value)
    with pytest.raises(ValueError, match=r"in training; .* or use eval mode"):
        layer.train()(torch.randn(4, 3), 0, one)
