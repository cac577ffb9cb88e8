"""FlatParams: parameters <-> one flat vector."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from constrained_optim._flat import FlatParams, max_abs, within

shapes = st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


def _params(shape_list, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shape_list]


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_get_set_round_trip(shape_list):
    params = _params(shape_list)
    flat = FlatParams(params)
    assert flat.n == sum(p.numel() for p in params)
    x = flat.get()
    assert x.shape == (flat.n,)
    assert torch.equal(x, torch.cat([p.detach().reshape(-1) for p in params]))
    new = torch.arange(flat.n, dtype=torch.float64)
    refs = [p for p in params]
    flat.set(new)
    assert torch.equal(flat.get(), new)
    # written in place: the user's tensors (same objects) hold the new values, shapes unchanged
    for p, ref, shape in zip(params, refs, shape_list):
        assert p is ref and p.shape == shape
    start = 0
    for p in params:
        assert torch.equal(p.detach().reshape(-1), new[start:start + p.numel()])
        start += p.numel()


def test_get_is_a_detached_copy():
    a = torch.zeros(3, requires_grad=True, dtype=torch.float64)
    flat = FlatParams([a])
    x = flat.get()
    assert not x.requires_grad
    x += 1.0
    assert torch.equal(a.detach(), torch.zeros(3, dtype=torch.float64))


def test_set_keeps_parameter_dtype_and_autograd_leaf():
    a = torch.zeros(2, 2, requires_grad=True)
    flat = FlatParams([a])
    flat.set(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert a.dtype == torch.float32 and a.is_leaf and a.requires_grad
    assert torch.equal(a.detach(), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_grad_with_missing_grads_counts_as_zero():
    a = torch.ones(2, 3, requires_grad=True, dtype=torch.float64)
    b = torch.ones(4, requires_grad=True, dtype=torch.float64)
    c = torch.ones(1, requires_grad=True, dtype=torch.float64)
    flat = FlatParams([a, b, c])
    assert torch.equal(flat.grad(), torch.zeros(11, dtype=torch.float64))
    (3.0 * b.sum() + (c ** 2).sum()).backward()   # a gets no grad
    assert a.grad is None
    expected = torch.cat([torch.zeros(6), 3.0 * torch.ones(4), torch.tensor([2.0])]).double()
    assert torch.equal(flat.grad(), expected)


def test_flatten_with_batch_shape_and_none():
    a = torch.zeros(2, 3, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    flat = FlatParams([a, b])
    ta = torch.arange(5 * 6, dtype=torch.float32).reshape(5, 2, 3)
    out = flat.flatten([ta, None], batch_shape=(5,))
    assert out.shape == (5, 10)
    assert torch.equal(out[:, :6], ta.reshape(5, 6))
    assert torch.equal(out[:, 6:], torch.zeros(5, 4))


def test_empty_parameter_list():
    with pytest.raises(ValueError, match="empty"):
        FlatParams([])


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_parameter(dtype):
    p = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match="dtype"):
        FlatParams([p])


def test_not_a_tensor():
    with pytest.raises(TypeError, match="list"):
        FlatParams([[1.0, 2.0]])


def test_requires_grad_false():
    with pytest.raises(ValueError, match="does not require grad"):
        FlatParams([torch.zeros(3, requires_grad=True), torch.zeros(2)])


def test_mixed_dtypes():
    with pytest.raises(TypeError, match="mixed dtypes"):
        FlatParams([torch.zeros(3, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)])


def test_different_devices():
    with pytest.raises(TypeError, match="devices"):
        FlatParams([torch.zeros(3, requires_grad=True), torch.zeros(2, device="meta", requires_grad=True)])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e300, 1e300), max_size=40))
def test_max_abs_is_the_infinity_norm(values):
    v = torch.tensor(values, dtype=torch.float64)
    assert max_abs(v) == (float(v.abs().max()) if values else 0.0)


def test_max_abs_propagates_nan_and_within_compares_slices():
    assert math.isnan(max_abs(torch.tensor([1.0, float("nan"), -3.0])))
    a = torch.zeros(10)
    b = a.clone()
    b[7] = 0.5
    assert within(a, b, 0.5, width=3) and not within(a, b, 0.49, width=3)
    b[7] = float("nan")
    assert not within(a, b, 1.0, width=3)


def test_holds_compares_the_parameters_with_a_vector():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[3.0]], requires_grad=True)
    flat = FlatParams([a, b])
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert flat.holds(x) and not flat.holds(x + 1e-6)
