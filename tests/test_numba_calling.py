"""How the numba backend's host code hands tensors to its kernels.

Dense tensors go by address (data pointer, shape, dtype witness), anything else as a
numpy view; both must give the same bits in every kernel. Inputs that cannot go by
address (a lazily negated view, a strided weight, a dy in another memory format) must be
read correctly, and a call the kernels cannot serve safely (a cumulative average with no
counter) is refused before anything is written.
"""

from __future__ import annotations

import pytest
import torch
from cases import assert_close, kernel_inputs

from batchnorm.kernels import numba_cpu

BACKEND = numba_cpu.BACKEND
EPS = 1e-5
MOMENTUM = 0.1
TOL = {torch.float32: (2e-5, 2e-4)}
LAYOUTS = {
    "nchw": ((4, 5, 3, 4), torch.contiguous_format),
    "channels_last": ((4, 5, 3, 4), torch.channels_last),
}

# ----------------------------------------------------------------------------------------
# tensors by address
# ----------------------------------------------------------------------------------------
ADDRESS_CASES = {
    # name: (shape, memory format, ghost chunk sizes or None)
    "nchw": ((4, 5, 3, 4), torch.contiguous_format, None),
    "channels_last_ghost": ((7, 6, 2, 3), torch.channels_last, (3, 3, 1)),
    "nc": ((12, 5), torch.contiguous_format, None),
    "ncl_ghost": ((6, 3, 7), torch.contiguous_format, (2, 2, 2)),
    # 2^16 values: the threaded kernels
    "channels_last_threaded": ((8, 8, 32, 32), torch.channels_last, (4, 4)),
}


def _every_kernel(x, dy, res, p, sizes, only_training=False):
    """Every numba kernel once (training forward and backward, plain or ghost; with
    the relu epilogue and a residual; eval; renorm's statistics pass; the first two
    alone with ``only_training``), from fresh copies of the buffers: all outputs, and
    the buffers and counters after."""
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    tracked, skipped = torch.tensor(3), torch.tensor(0)
    w, b = p["weight"], p["bias"]
    out = []
    if sizes is None:
        y, mean, invstd = BACKEND.forward_train(x, w, b, EPS, rm, rv, MOMENTUM, tracked, skipped)
        out += [y, mean, invstd, *BACKEND.backward_train(dy, x, w, mean, invstd)]
    else:
        y, mean, invstd = BACKEND.ghost_forward_train(
            x, w, b, EPS, sizes, rm, rv, MOMENTUM, tracked, skipped
        )
        out += [y, mean, invstd, *BACKEND.ghost_backward_train(dy, x, w, mean, invstd, sizes)]
    if only_training:
        return [*out, rm, rv, tracked, skipped]
    a, am, ai, mask = BACKEND.act_forward_train(
        x, w, b, EPS, rm, rv, None, tracked, skipped, residual=res, activation="relu"
    )
    grads = BACKEND.act_backward_train(dy, mask, x, w, b, am, ai, res, activation="relu")
    out += [a, am, ai, mask, *grads, BACKEND.forward_eval(x, w, b, rm, rv, EPS)]
    out.append(torch.from_numpy(numba_cpu.renorm_constants(
        x, EPS, rm, rv, MOMENTUM, tracked, skipped, 2.0, 1.0
    )))
    return [*out, rm, rv, tracked, skipped]


@pytest.mark.parametrize("name", list(ADDRESS_CASES))
def test_tensors_by_address_equal_tensors_as_arrays(name, monkeypatch) -> None:
    """The kernels take dense tensors by address (data pointer, shape, dtype) and
    anything else as numpy views. Both give the same bits, in every kernel; and
    tensors that cannot go by address (a strided weight, a dy with other strides than
    x) take the array path within the same call."""
    shape, fmt, sizes = ADDRESS_CASES[name]
    x, res, dy, p = kernel_inputs(shape, fmt, torch.float32, seed=9)
    threaded = x.numel() >= 1 << 16  # (the threaded kernels compile slowly)
    by_address = _every_kernel(x, dy, res, p, sizes, only_training=threaded)

    # All arrays: no dtype may go by address. The same array types, the same bits.
    with monkeypatch.context() as patch:
        patch.setattr(numba_cpu, "_WITNESSES", {})
        patch.setattr(numba_cpu, "_PLANS", {})
        arrays = _every_kernel(x, dy, res, p, sizes, only_training=threaded)
        _assert_same(by_address, arrays, "arrays", exact=True)

    if not threaded:
        # Mixed: a strided weight and (for 4d inputs) a dy in the other memory format
        # go as arrays, the rest by address. Other array types are another compilation,
        # whose contractions (fused multiply-adds) may round differently.
        mixed = dict(p, weight=torch.stack([p["weight"], p["weight"]], 1)[:, 0])
        assert not mixed["weight"].is_contiguous()
        other = torch.channels_last if fmt == torch.contiguous_format else torch.contiguous_format
        dy_other = dy.contiguous(memory_format=other) if dy.dim() == 4 else dy
        _assert_same(by_address, _every_kernel(x, dy_other, res, mixed, sizes), "mixed",
                     exact=False)


def _assert_same(actual, expected, what, exact) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a is None or e is None:
            assert a is None and e is None, f"{what}: output {i}"
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}: output {i}"
        if exact or not a.is_floating_point():
            assert torch.equal(a, e), f"{what}: output {i} differs"
        else:
            assert_close(a, e, *TOL[torch.float32], f"{what}: output {i}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_inputs_with_a_negation_bit_are_read_negated(layout) -> None:
    """torch's lazy negation (``torch._neg_view``) leaves the memory unnegated: such an
    input or dy must not go by address. Results equal those for the materialized
    negation."""
    shape, fmt = LAYOUTS[layout]
    x, _, dy, p = kernel_inputs(shape, fmt, torch.float32, seed=10)
    w, b = p["weight"], p["bias"]
    results = []
    for lazy in (True, False):
        xn = torch._neg_view(x) if lazy else x.neg()
        dyn = torch._neg_view(dy) if lazy else dy.neg()
        assert xn.is_neg() == lazy
        y, mean, invstd = BACKEND.forward_train(xn, w, b, EPS, None, None, None, None, None)
        results.append((y, mean, invstd, *BACKEND.backward_train(dyn, xn, w, mean, invstd)))
    for a, e in zip(*results):
        assert torch.equal(a, e)


def test_cumulative_average_without_counter_is_an_error() -> None:
    """momentum=None reads num_batches_tracked; without one the kernels would count in
    a shared sink, so the host refuses, naming the missing counter, and leaves the
    running statistics alone."""
    x, _, _, p = kernel_inputs((4, 5, 3, 4), torch.contiguous_format, torch.float32, seed=11)
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    with pytest.raises(ValueError, match="momentum=None.*num_batches_tracked"):
        BACKEND.forward_train(x, p["weight"], p["bias"], EPS, rm, rv, None, None, None)
    assert torch.equal(rm, p["running_mean"]) and torch.equal(rv, p["running_var"])
