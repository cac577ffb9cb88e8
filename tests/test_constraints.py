"""Constraint API, canonical form, folding and Jacobians (constrained_optim/constraints.py)."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import constrained_optim as co
from constrained_optim._flat import FlatParams
from constrained_optim.constraints import canonical, evaluate

F64 = torch.float64


def _param(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_()


# ------------------------------------------------------------------------------- values and flattening
@pytest.mark.parametrize("shape", [(), (1,), (5,), (2, 3), (2, 1, 4), (0,)])
@pytest.mark.parametrize("make", [co.ineq, co.eq])
def test_values_flatten_any_shape(shape, make):
    a = _param(*shape) if shape else _param(())
    con = make(lambda: 2.0 * a - 1.0, name="c")
    v = con.values()
    assert v.shape == (a.numel(),)
    assert torch.equal(v.detach(), (2.0 * a - 1.0).detach().reshape(-1))
    assert con.kind == ("ineq" if make is co.ineq else "eq")


def test_evaluate_stacks_inequalities_first_with_slices_and_default_names():
    a = _param(2, 3)
    b = _param(4, seed=1)
    cons = canonical([co.eq(lambda: b[:2]), co.ineq(lambda: a), co.eq(lambda: b.sum(), name="total"),
                      co.ineq(lambda: b ** 2)])
    assert [c.name for c in cons] == ["ineq0", "ineq1", "eq0", "total"]
    assert [c.kind for c in cons] == ["ineq", "ineq", "eq", "eq"]
    values = evaluate(cons, FlatParams([a, b]))
    assert values.p == 6 + 4 and values.m == 6 + 4 + 2 + 1
    assert values.slices == {"ineq0": slice(0, 6), "ineq1": slice(6, 10), "eq0": slice(10, 12),
                             "total": slice(12, 13)}
    expected = torch.cat([a.reshape(-1), b ** 2, b[:2], b.sum()[None]]).detach()
    assert torch.equal(values.c, expected)
    assert not values.c.requires_grad


def test_canonical_accepts_none_and_single_constraint():
    a = _param(2)
    assert canonical(None) == []
    one = canonical(co.ineq(lambda: a))
    assert len(one) == 1 and one[0].name == "ineq0"


def test_evaluate_without_constraints():
    a = _param(3)
    flat = FlatParams([a])
    values = evaluate([], flat)
    assert values.m == 0 and values.p == 0
    assert values.jacobian().shape == (0, 3)
    assert torch.equal(values.vjp(torch.zeros(0, dtype=F64)), torch.zeros(3, dtype=F64))


# ------------------------------------------------------------------------------------------- folding
# |c| >= 1e-100: the l2 fold squares its entries, so violations below ~1e-154 underflow to 0 (far below any
# tolerance); the feasible-set property is checked where the arithmetic can represent it.
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False).filter(lambda v: v == 0 or abs(v) >= 1e-100)
vectors = st.lists(st.one_of(finite, st.just(0.0)), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(vectors)
def test_fold_ineq_values_and_feasible_set(vals):
    c = torch.tensor(vals, dtype=F64)
    a = torch.zeros(len(vals), dtype=F64, requires_grad=True)
    l2 = co.ineq(lambda: a + c, fold="l2").values().detach()
    mx = co.ineq(lambda: a + c, fold="max").values().detach()
    assert l2.shape == (1,) and mx.shape == (1,)
    assert math.isclose(float(l2), float(torch.linalg.vector_norm(c.clamp(min=0))), rel_tol=1e-12)
    assert float(mx) == float(c.max())
    feasible = bool((c <= 0).all())
    assert (float(l2) <= 0) == feasible
    assert (float(mx) <= 0) == feasible
    assert float(l2) >= 0


@settings(max_examples=80, deadline=None)
@given(vectors)
def test_fold_eq_values_and_feasible_set(vals):
    c = torch.tensor(vals, dtype=F64)
    a = torch.zeros(len(vals), dtype=F64, requires_grad=True)
    l2 = co.eq(lambda: a + c, fold="l2").values().detach()
    mx = co.eq(lambda: a + c, fold="max").values().detach()
    assert math.isclose(float(l2), float(torch.linalg.vector_norm(c)), rel_tol=1e-12)
    assert float(mx) == float(c.abs().max())
    feasible = bool((c == 0).all())
    assert (float(l2) == 0) == feasible
    assert (float(mx) == 0) == feasible


def test_fold_reduces_rows_and_keeps_gradient():
    a = _param(3, 4)
    values = evaluate(canonical([co.ineq(lambda: a - 0.5, fold="max"), co.eq(lambda: a, fold="l2")]),
                      FlatParams([a]))
    assert values.m == 2 and values.p == 1
    J = values.jacobian()
    i = int(a.detach().reshape(-1).argmax())
    expected_max_row = torch.zeros(12, dtype=F64)
    expected_max_row[i] = 1.0
    assert torch.allclose(J[0], expected_max_row)
    x = a.detach().reshape(-1)
    assert torch.allclose(J[1], x / x.norm())


def test_fold_of_empty_tensor_is_empty():
    a = _param(3)
    assert co.ineq(lambda: a[:0], fold="l2").values().numel() == 0


# ------------------------------------------------------------------------------------------ Jacobians
shape_st = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


@settings(max_examples=25, deadline=None)
@given(param_shapes=st.lists(shape_st, min_size=1, max_size=3),
       out_shapes=st.lists(st.tuples(st.sampled_from(["ineq", "eq"]), shape_st), min_size=1, max_size=3),
       seed=st.integers(0, 2 ** 16))
def test_batched_jacobian_matches_autograd_functional(param_shapes, out_shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=F64).requires_grad_() for s in param_shapes]
    n = sum(p.numel() for p in params)

    def make_fn(kind_shape, k):
        _, shape = kind_shape
        size = max(1, math.prod(shape))
        W = torch.randn(size, n, generator=gen, dtype=F64)
        V = torch.randn(size, n, generator=gen, dtype=F64)

        def raw(*ps):
            x = torch.cat([q.reshape(-1) for q in ps])
            # nonlinear, couples all parameters, different per constraint
            out = torch.sin(W @ x) * (1.0 + k) + (V @ torch.tanh(x)) ** 2 + x.prod() * 0.1
            return out.reshape(shape)
        return raw

    raws = [make_fn(ks, k) for k, ks in enumerate(out_shapes)]
    cons = [(co.ineq if kind == "ineq" else co.eq)((lambda r=r: r(*params)), name=f"c{k}")
            for k, ((kind, _), r) in enumerate(zip(out_shapes, raws))]
    cons = canonical(cons)
    values = evaluate(cons, FlatParams(params), check_dependence=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # the batched path must not fall back here
        J = values.jacobian()

    order = [int(c.name[1:]) for c in cons]   # canonical order: inequalities first
    blocks = []
    for k in order:
        jac = torch.autograd.functional.jacobian(raws[k], tuple(params))
        rows = max(1, math.prod(out_shapes[k][1]))
        blocks.append(torch.cat([j.reshape(rows, -1) for j in jac], dim=1))
    expected = torch.cat(blocks)
    assert J.shape == expected.shape == (values.m, n)
    assert torch.allclose(J, expected, rtol=1e-10, atol=1e-12)
    # a single vector-Jacobian product agrees with the full Jacobian
    w = torch.randn(values.m, generator=gen, dtype=F64)
    assert torch.allclose(values.vjp(w), expected.T @ w, rtol=1e-10, atol=1e-12)


def test_jacobian_of_unused_parameter_is_zero():
    a, b = _param(3), _param(2, seed=1)
    values = evaluate(canonical([co.eq(lambda: a ** 2)]), FlatParams([a, b]))
    J = values.jacobian()
    assert torch.allclose(J[:, :3], torch.diag(2 * a.detach()))
    assert torch.equal(J[:, 3:], torch.zeros(3, 2, dtype=F64))


class _NumpySquare(torch.autograd.Function):
    """x ↦ x², with a backward that leaves torch (not batchable by vmap)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.from_numpy(2.0 * x.detach().numpy() * g.detach().numpy())


def test_row_by_row_fallback_when_vmap_fails():
    a = _param(2, 2)
    b = _param(3, seed=1)
    cons = canonical([co.ineq(lambda: _NumpySquare.apply(a) + b.sum()), co.eq(lambda: b * a[0, 0])])
    values = evaluate(cons, FlatParams([a, b]))
    with pytest.warns(RuntimeWarning, match="one row at a time"):
        J = values.jacobian()

    def raw(pa, pb):
        return torch.cat([(pa ** 2 + pb.sum()).reshape(-1), pb * pa[0, 0]])
    jac = torch.autograd.functional.jacobian(raw, (a, b))
    expected = torch.cat([j.reshape(7, -1) for j in jac], dim=1)
    assert torch.allclose(J, expected, rtol=1e-12, atol=1e-14)


def test_row_by_row_fallback_by_monkeypatch(monkeypatch):
    a = _param(4)
    values = evaluate(canonical([co.ineq(lambda: torch.cumsum(a, 0) * a)]), FlatParams([a]))
    batched = values.jacobian()
    real_grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("vmap: batching rule not implemented (forced by the test)")
        return real_grad(*args, **kwargs)
    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    with pytest.warns(RuntimeWarning, match="forced by the test"):
        rows = values.jacobian()
    assert torch.allclose(rows, batched, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------- errors
def test_fn_returning_float():
    a = _param(2)
    with pytest.raises(TypeError, match="float"):
        co.ineq(lambda: float(a.sum()), name="f").values()


def test_fn_returning_non_floating_tensor():
    a = _param(2)
    with pytest.raises(TypeError, match="int64"):
        co.eq(lambda: (a > 0).long()).values()


def test_constraint_not_depending_on_parameters():
    a = _param(2)
    flat = FlatParams([a])
    with pytest.raises(ValueError, match="does not depend"):
        evaluate(canonical([co.ineq(lambda: torch.ones(2, dtype=F64), name="const")]), flat, check_dependence=True)
    with pytest.raises(ValueError, match="does not depend"):
        evaluate(canonical([co.ineq(lambda: a.detach() - 1.0)]), flat, check_dependence=True)
    other = _param(2, seed=3)   # depends on a tensor that is not optimized
    with pytest.raises(ValueError, match="'mine'"):
        evaluate(canonical([co.ineq(lambda: other * 2.0, name="mine")]), flat, check_dependence=True)


def test_constraint_empty_tensor_with_dependence_check():
    a = _param(2)
    with pytest.raises(ValueError, match="empty"):
        evaluate(canonical([co.ineq(lambda: a[:0])]), FlatParams([a]), check_dependence=True)


def test_wrong_dtype_vs_params():
    a = _param(3)
    with pytest.raises(TypeError, match="float32"):
        evaluate(canonical([co.ineq(lambda: a.float() - 1.0)]), FlatParams([a]))


def test_wrong_device_vs_params():
    a = _param(3)
    with pytest.raises(TypeError, match="meta"):
        evaluate(canonical([co.eq(lambda: torch.zeros(3, dtype=F64, device="meta"))]), FlatParams([a]))


def test_duplicate_names():
    a = _param(2)
    with pytest.raises(ValueError, match="unique.*'dup'"):
        canonical([co.ineq(lambda: a, name="dup"), co.eq(lambda: a, name="dup")])
    # an explicit name that equals a default name also collides
    with pytest.raises(ValueError, match="ineq0"):
        canonical([co.ineq(lambda: a), co.eq(lambda: a, name="ineq0")])


@pytest.mark.parametrize("bad", [lambda: 1.0, "x <= 0", None, 3])
def test_non_constraint_entries(bad):
    a = _param(2)
    with pytest.raises(TypeError, match=r"constraints\[1\]"):
        canonical([co.ineq(lambda: a), bad])


@pytest.mark.parametrize("fold", ["l1", "L2", "sum", 2, True])
def test_bad_fold(fold):
    with pytest.raises(ValueError, match="fold"):
        co.ineq(lambda: torch.zeros(1), fold=fold)


@pytest.mark.parametrize("kind", ["le", "EQ", "", None])
def test_bad_kind(kind):
    with pytest.raises(ValueError, match="kind"):
        co.Constraint(lambda: torch.zeros(1), kind)


def test_non_callable_fn_and_bad_name():
    with pytest.raises(TypeError, match="callable"):
        co.ineq(torch.zeros(2))
    with pytest.raises(TypeError, match="name"):
        co.eq(lambda: torch.zeros(1), name=3)


def test_repr_names_kind_and_fold():
    assert repr(co.ineq(lambda: torch.zeros(1), name="n", fold="max")) == "ineq('n', fold='max')"
    assert repr(co.eq(lambda: torch.zeros(1), name="e")) == "eq('e')"
