"""The Jacobian operator (constrained_optim/jacobian.py): dense row blocks and bound rows by column and sign."""
import pytest
import torch

import constrained_optim as co
from constrained_optim._flat import FlatParams
from constrained_optim.constraints import canonical, evaluate
from constrained_optim.jacobian import Jacobian

F64 = torch.float64


def _random_jacobian(dtype, seed=0, n=300):
    """Rows: a dense block of 3, two bound rows, a dense block of 1, three bound rows (two on one column)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(3, n, generator=gen, dtype=F64).to(dtype), torch.randn(1, n, generator=gen, dtype=F64).to(dtype)]
    dense_rows = torch.tensor([0, 1, 2, 5])
    bound_rows = torch.tensor([3, 4, 6, 7, 8])
    columns = torch.tensor([7, 0, n - 1, 7, 7])
    signs = torch.tensor([-1.0, 1.0, 1.0, 1.0, -1.0], dtype=dtype)
    J = Jacobian(blocks, dense_rows, bound_rows, columns, signs)
    dense = torch.zeros(9, n, dtype=F64)
    dense[dense_rows] = torch.cat(blocks).to(F64)
    dense[bound_rows, columns] = signs.to(F64)
    return J, dense, gen


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_products_match_the_dense_matrix(dtype):
    J, dense, gen = _random_jacobian(dtype)
    v = torch.randn(dense.shape[1], generator=gen, dtype=F64)
    V = torch.randn(dense.shape[1], 4, generator=gen, dtype=F64)
    w = torch.randn(9, generator=gen, dtype=F64)
    # float32 rows: every product accumulates in float64, so it matches float64 arithmetic on the same numbers
    assert torch.allclose(J @ v, dense @ v, rtol=1e-13, atol=1e-13)
    assert torch.allclose(J @ V, dense @ V, rtol=1e-13, atol=1e-13)
    assert torch.allclose(J.T @ w, dense.T @ w, rtol=1e-13, atol=1e-13)
    assert torch.allclose(J.bilinear(w, v), w @ (dense @ v), rtol=1e-13, atol=1e-13)
    G, JVt, vVt = J.gram_and_times([V.T[:3], v[None]], left=[v[None]])
    assert torch.allclose(G, dense @ dense.T, rtol=1e-13, atol=1e-13)
    assert torch.allclose(JVt, dense @ torch.cat([V[:, :3], v[:, None]], 1), rtol=1e-13, atol=1e-13)
    assert torch.allclose(vVt, v @ torch.cat([V[:, :3], v[:, None]], 1), rtol=1e-13)
    assert J.gram() is G                                   # computed once
    assert torch.allclose(J.row_norms(), torch.linalg.vector_norm(dense, dim=1), rtol=1e-6)
    assert torch.equal(J.row_amax(), dense.abs().amax(dim=1))
    assert torch.equal(J.to_dense().to(F64), dense) and J.finite


def test_nonfinite_rows_are_detected():
    J, dense, _ = _random_jacobian(F64)
    assert J.finite
    blocks = [dense[:3].clone(), dense[5:6].clone()]
    blocks[1][0, 5] = float("nan")
    J = Jacobian(blocks, J.dense_rows, J.bound_rows, J.columns, J.signs)
    assert not J.finite and torch.isnan(J.row_amax()[5]) and not torch.isnan(J.row_amax()[:5]).any()


def test_change_between_points_needs_no_cancellation():
    J, dense, gen = _random_jacobian(F64)
    moved = [B + 1e-9 * torch.randn(B.shape, generator=gen, dtype=F64) for B in J.blocks]
    J2 = Jacobian(moved, J.dense_rows, J.bound_rows, J.columns, J.signs)
    w = torch.randn(9, generator=gen, dtype=F64)
    assert torch.allclose(J2.rmatmul_change(J, w), (J2.to_dense() - dense).T @ w, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sums_with_a_transposed_product_match_the_dense_matrix(dtype):
    """``base + Jᵀw`` (the certificate's residual ∇f + Jᵀλ) leaves ``base`` as it was, and the change of the
    Lagrangian gradient ``μ (g − g') + (J − J')ᵀw`` (the BFGS pair's y) over column slices narrower than n equals
    its dense value, with bound rows (which do not change) and float32 rows."""
    from constrained_optim import jacobian
    J, dense, gen = _random_jacobian(dtype, n=1000)
    w = torch.randn(9, generator=gen, dtype=F64)
    base = torch.randn(1000, generator=gen, dtype=F64)
    kept = base.clone()
    assert torch.allclose(J.rmatmul(w, base=base), base + dense.T @ w, rtol=1e-13, atol=1e-13)
    assert torch.equal(base, kept)
    moved = [(B.to(F64) + 1e-3 * torch.randn(B.shape, generator=gen, dtype=F64)).to(dtype) for B in J.blocks]
    J2 = Jacobian(moved, J.dense_rows, J.bound_rows, J.columns, J.signs)
    g2 = base + 1e-6 * torch.randn(1000, generator=gen, dtype=F64)
    expected = 0.3 * (g2 - base) + (J2.to_dense().to(F64) - dense).T @ w
    for slice_entries in (jacobian._SLICE, 256):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(jacobian, "_SLICE", slice_entries)      # 256 entries: slices of 85 columns
            out = torch.full((1000,), float("nan"), dtype=F64)
            change = J2.rmatmul_change(J, w, out=out, gradients=(0.3, g2, base))
        assert change is out
        # (float32 rows differ in float32, as autograd wrote them: the difference is rounded once there)
        rtol = 1e-6 if dtype == torch.float32 else 1e-12
        assert torch.allclose(change, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))
    assert torch.allclose(J2.rmatmul_change(J, w), (J2.to_dense().to(F64) - dense).T @ w, rtol=rtol, atol=1e-15)


def test_box_rows_are_recorded_by_column_not_differentiated():
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    y = torch.randn(3, dtype=F64, requires_grad=True)
    lower = torch.full((4, 5), -1.0, dtype=F64)
    lower[0, 1] = float("-inf")
    box = co.Box(x, lower=lower, upper=2.0)
    cons = canonical([co.ineq(lambda: (x ** 2).sum() + y.sum() - 1, name="ball"), box, co.NonNegative(y),
                      co.eq(lambda: x[0] - y[:1].sum(), name="tie")])
    flat = FlatParams([x, y])
    values = evaluate(cons, flat)
    J = values.structured_jacobian()
    assert J.bounds == 19 + 20 + 3 and J.dense.shape == (1 + 5, 23)     # only "ball" and "tie" are differentiated
    # the same rows as ordinary constraints, differentiated by autograd
    plain = canonical([co.ineq(lambda: (x ** 2).sum() + y.sum() - 1, name="ball"), co.ineq(box._rows, name="box0"),
                       co.ineq(lambda: -y, name="nonnegative0"), co.eq(lambda: x[0] - y[:1].sum(), name="tie")])
    reference = evaluate(plain, flat)
    assert torch.equal(values.c, reference.c)
    assert torch.equal(J.to_dense(), reference.jacobian())
    assert torch.equal(values.jacobian(), reference.jacobian())


def test_box_on_a_tensor_that_is_not_a_parameter_falls_back_to_autograd():
    x = torch.randn(6, dtype=F64, requires_grad=True)
    view = x[:3]                                            # a view: not one of the optimized tensors
    values = evaluate(canonical([co.Box(view, lower=-1.0, upper=1.0)]), FlatParams([x]))
    J = values.structured_jacobian()
    assert J.bounds == 0
    expected = torch.cat([-torch.eye(3, 6, dtype=F64), torch.eye(3, 6, dtype=F64)])
    assert torch.equal(J.to_dense(), expected)


def test_linf_ball_rows_are_bounds():
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    ball = co.Ball(x, radius=0.5, p="inf", center=0.1)
    values = evaluate(canonical([ball]), FlatParams([x]))
    reference = evaluate(canonical([co.ineq(ball._value, name="ball0")]), FlatParams([x]))
    J = values.structured_jacobian()
    assert J.bounds == 12 and torch.equal(values.c, reference.c)
    assert torch.equal(J.to_dense(), reference.jacobian())


def _two_blocks(n, gen, first=None):
    """A Jacobian with a dense block of 3 rows (``first`` if given), a bound row and a dense block of 1 row."""
    blocks = [first if first is not None else torch.randn(3, n, generator=gen, dtype=F64),
              torch.randn(1, n, generator=gen, dtype=F64)]
    J = Jacobian(blocks, torch.tensor([0, 1, 2, 4]), torch.tensor([3]), torch.tensor([5]), torch.tensor([-1.0], dtype=F64))
    dense = torch.zeros(5, n, dtype=F64)
    dense[[0, 1, 2, 4]] = torch.cat(blocks)
    dense[3, 5] = -1.0
    return J, dense


def test_shared_blocks_and_known_products_equal_fresh_ones():
    # n large enough that the blocks stay separate (and the thin products run over several column slices)
    n = 300_000
    gen = torch.Generator().manual_seed(3)
    previous, _ = _two_blocks(n, gen)
    W, g = torch.randn(4, n, generator=gen, dtype=F64), torch.randn(1, n, generator=gen, dtype=F64)
    previous.gram_and_times([W, g], left=[g])
    J, dense = _two_blocks(n, gen, first=previous.blocks[0].clone())     # a linear constraint: equal rows
    J.share_unchanged(previous)
    assert J.blocks[0] is previous.blocks[0] and J.shared == [True, False]
    # the rows of block 0 times the first three rows of W are known; NaN marks entries that must not be used
    W2 = torch.cat([W[:3], torch.randn(1, n, generator=gen, dtype=F64)])
    K = torch.full((4, 5), float("nan"), dtype=F64)
    K[:3, :3] = dense[:3] @ W2[:3].T
    known = (K, [True, False], torch.tensor([True, True, True, False, False]))
    G, JVt, gVt = J.gram_and_times([W2, g], left=[g], known=known)
    V = torch.cat([W2, g])
    assert torch.allclose(G, dense @ dense.T, rtol=1e-12, atol=1e-9)
    assert torch.allclose(JVt, dense @ V.T, rtol=1e-12, atol=1e-9)
    assert torch.allclose(gVt, g @ V.T, rtol=1e-12, atol=1e-9)
    w = torch.randn(5, generator=gen, dtype=F64)
    change = J.rmatmul_change(previous, w)
    assert torch.allclose(change, (dense - previous.to_dense()).T @ w, rtol=1e-12, atol=1e-12)
    assert float(change[:6].abs().max()) > 0      # block 1 moved


@pytest.mark.parametrize("stacked", [False, True], ids=["by-rows", "stacked"])
def test_thin_products_that_share_a_block_equal_their_dense_values(stacked, monkeypatch):
    """The thin path multiplies each distinct fat block once per slice by every thin block of any product that
    needs it (the L-BFGS pass, the kept rows times the new columns and a changed row's Gram all read the same
    kept block): every product still equals its dense value, also where one thin block and one fat block meet
    in two products. Both ways of doing it: one matrix-vector product per thin row (CPU), the thin blocks
    stacked (other devices; forced here)."""
    from constrained_optim import jacobian
    from constrained_optim.jacobian import _products
    if stacked:
        monkeypatch.setattr(jacobian, "_thin_products_by_rows", jacobian._thin_products_stacked)
    n = 100_000              # several column slices of the thin path
    gen = torch.Generator().manual_seed(6)
    A, W = torch.randn(63, n, generator=gen, dtype=F64), torch.randn(6, n, generator=gen, dtype=F64)
    g, r, new = (torch.randn(k, n, generator=gen, dtype=F64) for k in (1, 1, 2))
    pairs = [([r, g], [W, g]), ([A], [new, g]), ([r], [A, r]), ([g], [A])]
    outs = _products(pairs, torch.zeros((), dtype=F64))
    for out, (L, R) in zip(outs, pairs):
        expected = torch.cat(L) @ torch.cat(R).T
        assert out.shape == expected.shape
        assert torch.allclose(out, expected, rtol=1e-12, atol=1e-9)


def test_blocks_that_differ_are_not_shared():
    n = 300_000
    gen = torch.Generator().manual_seed(4)
    previous, _ = _two_blocks(n, gen)
    previous.gram()
    first = previous.blocks[0].clone()
    first[1, 7] = torch.nextafter(first[1, 7], torch.tensor(float("inf"), dtype=F64))   # one entry, one ulp
    J, dense = _two_blocks(n, gen, first=first)
    J.share_unchanged(previous)
    assert J.shared == [False, False] and J.blocks[0] is not previous.blocks[0]
    assert torch.allclose(J.gram(), dense @ dense.T, rtol=1e-12, atol=1e-9)


def test_transposed_product_reads_only_the_weighted_rows_of_a_large_block():
    n = 400_000         # block 0 holds more than 2²⁰ entries
    gen = torch.Generator().manual_seed(5)
    J, dense = _two_blocks(n, gen)
    for w in ([0.0, 2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 3.0, 0.0], [1.0, 2.0, 3.0, 0.0, 0.0]):
        w = torch.tensor(w, dtype=F64)
        assert torch.allclose(J.T @ w, dense.T @ w, rtol=1e-12, atol=1e-12)
    W = torch.zeros(5, 2, dtype=F64)
    W[2, 1] = 1.5
    assert torch.allclose(J.T @ W, dense.T @ W, rtol=1e-12, atol=1e-12)
    # the rows of weight zero are not read: a NaN there does not reach the product
    J.blocks[0][0, 11] = float("nan")
    w = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)
    assert torch.allclose(J.T @ w, dense[1], rtol=0, atol=0)


def test_bilinear_form_reads_only_the_weighted_rows_of_a_large_block():
    """``wᵀ J v`` (the line search's slope of the violation) with the weights the line search uses: the rows of weight
    zero of a large block are not read."""
    n = 400_000
    gen = torch.Generator().manual_seed(6)
    J, dense = _two_blocks(n, gen)
    v = torch.randn(n, generator=gen, dtype=F64)
    for w in ([0.0, 2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0, 0.0]):
        w = torch.tensor(w, dtype=F64)
        assert torch.allclose(J.bilinear(w, v), w @ (dense @ v), rtol=1e-12, atol=1e-9)
    J.blocks[0][0, 11] = float("nan")
    w = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)
    assert torch.allclose(J.bilinear(w, v), dense[1] @ v, rtol=1e-12)
