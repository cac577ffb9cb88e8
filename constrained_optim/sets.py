"""Simple sets attached to one parameter: exact projections and the same sets as constraints.

A set ``S`` constrains one parameter tensor ``x`` (all its elements together, unless said otherwise). Each
set knows its Euclidean projection

    P_S(x) = argmin_{y ∈ S} ½‖y − x‖²        (‖·‖ the Frobenius norm over the whole tensor)

and states itself as ordinary constraints ``c_I(x) <= 0`` / ``c_E(x) = 0`` (:meth:`Set.as_constraint`).

    Box          l <= x <= u (elementwise)                 P(x) = min(max(x, l), u)
    NonNegative  x >= 0                                     P(x) = max(x, 0)
    Ball, p=2    ‖x − c‖₂ <= r                              P(x) = c + (x − c) · min(1, r / ‖x − c‖₂)
    Ball, p=∞    ‖x − c‖∞ <= r                              P(x) = min(max(x, c − r), c + r)
    Ball, p=1    ‖x − c‖₁ <= r                              P(x) = x inside; else c + sign(d) ⊙ Δ_r(|d|),
                                                            d = x − c
    Simplex      x >= 0, Σᵢ xᵢ = r (per slice)              P(x) = Δ_r(x) = max(x − θ, 0)  with  Σ P(x) = r
    Sphere       ‖x − c‖₂ = r            (nonconvex)        P(x) = c + r (x − c) / ‖x − c‖₂
    Stiefel      WᵀW = I or WWᵀ = I      (nonconvex)        P(W) = U Vᵀ  for  W = U Σ Vᵀ (thin SVD)

``Δ_r`` is the projection onto the simplex ``{w >= 0, Σ w = r}``. Its threshold ``θ`` is found by sorting
(Duchi, Shalev-Shwartz, Singer & Chandra 2008): with ``u`` the entries sorted in decreasing order,

    ρ = max{ j : u_j − (Σ_{i<=j} u_i − r) / j > 0 },     θ = (Σ_{i<=ρ} u_i − r) / ρ.

The ℓ1-ball projection projects the magnitudes ``|x − c|`` onto ``Δ_r`` and restores the signs. The Stiefel
projection is the polar factor of ``W``, the nearest matrix (in Frobenius norm) whose smaller Gram matrix is
the identity.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .constraints import Bounds, Constraint, eq, ineq

__all__ = ["Set", "Box", "NonNegative", "Ball", "Simplex", "Sphere", "Stiefel"]


# ------------------------------------------------------------------------------------------- helpers
def _check_param(param: object, cls: str) -> Tensor:
    if not isinstance(param, Tensor):
        raise TypeError(f"{cls} needs a torch.Tensor parameter, got {type(param).__name__}")
    if not param.is_floating_point():
        raise TypeError(f"{cls} needs a floating-point parameter, got dtype {param.dtype}")
    return param


def _check_name(name: object, what: str = "name") -> str | None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"{what} must be a string or None, got {type(name).__name__}")
    return name


def _check_radius(radius: object, cls: str) -> float:
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
        raise TypeError(f"{cls} radius must be a real number, got {type(radius).__name__}")
    radius = float(radius)
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"{cls} radius must be positive and finite, got {radius}")
    return radius


def _as_field(value: object, param: Tensor, option: str, cls: str) -> Tensor:
    """A float or tensor option as a tensor of ``param``'s shape, dtype and device."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{cls} {option} must be a float or a tensor, got {type(value).__name__}")
    t = torch.as_tensor(value, dtype=param.dtype, device=param.device)
    try:
        return t.detach().expand(param.shape).clone()
    except RuntimeError:
        raise ValueError(f"{cls} {option} of shape {tuple(t.shape)} does not broadcast to the parameter's "
                         f"shape {tuple(param.shape)}") from None


def _check_nan(t: Tensor, option: str, cls: str) -> None:
    if torch.isnan(t).any():
        raise ValueError(f"{cls} {option} contains NaN; expected numbers (±inf for no bound)")


def _like(t: Tensor, x: Tensor) -> Tensor:
    return t.to(dtype=x.dtype, device=x.device)


def _summary(t: Tensor) -> str:
    """Short repr of a stored option: the number if all entries agree, else its shape."""
    if t.numel() > 0 and bool((t == t.reshape(-1)[0]).all()):
        return repr(float(t.reshape(-1)[0]))
    return f"<tensor {tuple(t.shape)}>"


def _simplex_last(v: Tensor, radius: float) -> Tensor:
    """Project every slice ``v[..., :]`` onto ``{w >= 0, Σ w = radius}`` (sort-based, see module doc)."""
    n = v.shape[-1]
    u = torch.sort(v, dim=-1, descending=True).values
    excess = u.cumsum(-1) - radius                              # Σ_{i<=j} u_i − r
    j = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    rho = torch.where(u * j > excess, j, torch.zeros_like(j)).amax(-1, keepdim=True)
    # j = 1 always qualifies in exact arithmetic; the clamp only guards against r lost to rounding
    rho = rho.clamp(min=1)
    theta = excess.gather(-1, rho.long() - 1) / rho
    return (v - theta).clamp(min=0)


# ----------------------------------------------------------------------------------------- base class
class Set:
    """A set ``S`` that one parameter must lie in.

    Subclasses define ``_project(x)`` (the exact Euclidean projection, on a detached tensor) and
    ``_constraints(base)`` (the set as constraints on ``self.param``).

    Args:
        param: the tensor the set constrains (usually a leaf that requires grad).
        name: base name of the constraints built by :meth:`as_constraint`.
    """

    convex: bool = True

    def __init__(self, param: Tensor, name: str | None = None):
        self.param = _check_param(param, type(self).__name__)
        self.name = _check_name(name)

    def project(self, x: Tensor) -> Tensor:
        """``P_S(x) = argmin_{y ∈ S} ½‖y − x‖²`` as a new tensor (no autograd; ``x``'s dtype and device)."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{type(self).__name__}.project needs a floating torch.Tensor, got {got}")
        if x.shape != self.param.shape:
            raise ValueError(f"{type(self).__name__}.project needs a tensor of the parameter's shape "
                             f"{tuple(self.param.shape)}, got {tuple(x.shape)}")
        with torch.no_grad():
            x = x.detach()
            if x.numel() == 0:
                return x.clone()
            return self._project(x)

    def project_(self) -> None:
        """In place: ``param ← P_S(param)``."""
        with torch.no_grad():
            self.param.copy_(self.project(self.param))

    def as_constraint(self, name: str | None = None) -> list[Constraint]:
        """The set as constraints on ``param``; their functions read ``param`` when called.

        Constraint names start from ``name``, else the set's name, else the lowercase class name.
        """
        base = _check_name(name) or self.name or type(self).__name__.lower()
        return self._constraints(base)

    def _project(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define a projection")

    def _constraints(self, base: str) -> list[Constraint]:
        raise NotImplementedError(f"{type(self).__name__} does not define its constraints")

    def _options(self) -> str:
        return ""

    def __repr__(self) -> str:
        options = self._options()
        return (f"{type(self).__name__}(shape={tuple(self.param.shape)}{', ' + options if options else ''}, "
                f"name={self.name!r})")


# ----------------------------------------------------------------------------------------------- sets
class Box(Set):
    """``l <= x <= u`` elementwise; ``P(x) = min(max(x, l), u)``.

    Args:
        param: the constrained tensor.
        lower, upper: floats or tensors broadcastable to ``param.shape``; ``-inf`` / ``+inf`` entries (or
            ``None``) leave that side unbounded. At least one must be given; ``lower <= upper``.
        name: base constraint name.

    ``as_constraint``: one inequality whose rows are ``l − x`` (finite ``l`` entries) followed by ``x − u``
    (finite ``u`` entries), flattened: a :class:`~constrained_optim.constraints.Bounds` (row gradients ∓e_k, which
    ConstrainedSQP never forms).
    """

    def __init__(self, param: Tensor, lower: float | Tensor | None = None, upper: float | Tensor | None = None,
                 name: str | None = None):
        super().__init__(param, name)
        if lower is None and upper is None:
            raise ValueError("Box needs lower, upper or both; got neither")
        self.lower = _as_field(-math.inf if lower is None else lower, param, "lower", "Box")
        self.upper = _as_field(math.inf if upper is None else upper, param, "upper", "Box")
        _check_nan(self.lower, "lower", "Box")
        _check_nan(self.upper, "upper", "Box")
        if (self.lower == math.inf).any():
            raise ValueError("Box lower contains +inf, which no finite value satisfies; expected < +inf")
        if (self.upper == -math.inf).any():
            raise ValueError("Box upper contains -inf, which no finite value satisfies; expected > -inf")
        if (self.lower > self.upper).any():
            raise ValueError("Box lower must be <= upper everywhere; got lower > upper at "
                             f"{int((self.lower > self.upper).sum())} entries")
        # flat indices of the finite bounds, found once so that evaluating the constraint does not sync
        self._lower_rows = torch.isfinite(self.lower).reshape(-1).nonzero().reshape(-1)
        self._upper_rows = torch.isfinite(self.upper).reshape(-1).nonzero().reshape(-1)

    def _project(self, x: Tensor) -> Tensor:
        return torch.clamp(x, min=_like(self.lower, x), max=_like(self.upper, x))

    def _rows(self) -> Tensor:
        x = self.param
        below = (_like(self.lower, x) - x).reshape(-1).index_select(0, self._lower_rows.to(x.device))
        above = (x - _like(self.upper, x)).reshape(-1).index_select(0, self._upper_rows.to(x.device))
        return torch.cat([below, above])

    def _constraints(self, base: str) -> list[Constraint]:
        index = torch.cat([self._lower_rows, self._upper_rows])
        signs = torch.cat([-torch.ones_like(self._lower_rows), torch.ones_like(self._upper_rows)])
        return [Bounds(self._rows, self.param, index, signs.to(self.param.dtype), name=base)]

    def _options(self) -> str:
        return f"lower={_summary(self.lower)}, upper={_summary(self.upper)}"


class NonNegative(Set):
    """``x >= 0`` elementwise; ``P(x) = max(x, 0)``. ``as_constraint``: one inequality ``−x <= 0`` (a
    :class:`~constrained_optim.constraints.Bounds`)."""

    def _project(self, x: Tensor) -> Tensor:
        return x.clamp(min=0)

    def _constraints(self, base: str) -> list[Constraint]:
        return [_nonnegative(self.param, base)]


def _nonnegative(param: Tensor, name: str) -> Bounds:
    """``−x <= 0`` as bound rows (σ = −1 on every entry)."""
    index = torch.arange(param.numel(), device=param.device)
    signs = -torch.ones(param.numel(), dtype=param.dtype, device=param.device)
    return Bounds(lambda: -param, param, index, signs, name=name)


def _parse_p(p: object) -> float:
    if isinstance(p, str) and p.lower() == "inf":
        return math.inf
    if not isinstance(p, bool) and isinstance(p, numbers.Real) and p in (1, 2, math.inf):
        return float(p)
    raise ValueError(f"Ball p must be 1, 2 or inf, got {p!r}")


class Ball(Set):
    """``‖x − c‖_p <= r`` over the whole tensor, ``p ∈ {1, 2, ∞}``.

    Projections (``d = x − c``):

        p = 2:  c + d · min(1, r / ‖d‖₂)
        p = ∞:  min(max(x, c − r), c + r)
        p = 1:  x if ‖d‖₁ <= r, else c + sign(d) ⊙ Δ_r(|d|)   (Δ_r: sort-based simplex projection)

    Args:
        param: the constrained tensor.
        radius: ``r > 0``, finite.
        p: ``1``, ``2``, ``float('inf')`` or ``"inf"``.
        center: ``c``: ``None`` (zero), a float, or a tensor broadcastable to ``param.shape``.
        name: base constraint name.

    ``as_constraint``: one inequality: ``(‖d‖₂² − r²) / (2r)`` (p = 2, smooth, equal to ``‖d‖₂ − r`` to
    first order at the boundary), ``‖d‖₁ − r`` (p = 1), or the rows ``d − r`` then ``−d − r`` (p = ∞, a
    :class:`~constrained_optim.constraints.Bounds`).
    """

    def __init__(self, param: Tensor, radius: float = 1.0, p: float | str = 2,
                 center: float | Tensor | None = None, name: str | None = None):
        super().__init__(param, name)
        self.radius = _check_radius(radius, "Ball")
        self.p = _parse_p(p)
        self.center = _as_field(0.0 if center is None else center, param, "center", "Ball")
        if not torch.isfinite(self.center).all():
            raise ValueError("Ball center must be finite (no NaN or inf)")

    def _project(self, x: Tensor) -> Tensor:
        c, r = _like(self.center, x), self.radius
        if self.p == math.inf:
            return torch.clamp(x, min=c - r, max=c + r)
        d = x - c
        if self.p == 2:
            norm = torch.linalg.vector_norm(d)
            return torch.where(norm <= r, x, c + d * (r / norm))
        inside = d.abs().sum() <= r
        w = _simplex_last(d.abs().reshape(1, -1), r).reshape(d.shape)
        return torch.where(inside, x, c + torch.sign(d) * w)

    def _value(self) -> Tensor:
        d = self.param - _like(self.center, self.param)
        r = self.radius
        if self.p == 2:
            return ((d * d).sum() - r * r) / (2 * r)
        if self.p == 1:
            return d.abs().sum() - r
        return torch.cat([(d - r).reshape(-1), (-d - r).reshape(-1)])

    def _constraints(self, base: str) -> list[Constraint]:
        if self.p != math.inf:
            return [ineq(self._value, name=base)]
        index = torch.arange(self.param.numel(), device=self.param.device).repeat(2)
        signs = torch.cat([torch.ones(self.param.numel()), -torch.ones(self.param.numel())])
        return [Bounds(self._value, self.param, index, signs.to(self.param), name=base)]

    def _options(self) -> str:
        p = "inf" if self.p == math.inf else int(self.p)
        return f"radius={self.radius}, p={p!r}, center={_summary(self.center)}"


class Simplex(Set):
    """``x >= 0, Σ x = r``: the whole tensor (``dim=None``) or every slice along ``dim`` is a simplex.

    ``P(x) = max(x − θ, 0)`` with one threshold ``θ`` per slice chosen so that the slice sums to ``r``
    (sort-based, Duchi et al. 2008; all slices at once).

    Args:
        param: the constrained tensor.
        radius: ``r > 0``, finite.
        dim: ``None`` (one simplex) or the dimension along which each slice is a simplex (e.g. ``dim=1``:
            every row of a matrix).
        name: base constraint name.

    ``as_constraint``: ``ineq(−x)`` named ``"{name}.nonneg"`` and ``eq(x.sum(dim) − r)`` named
    ``"{name}.sum"``.
    """

    def __init__(self, param: Tensor, radius: float = 1.0, dim: int | None = None, name: str | None = None):
        super().__init__(param, name)
        self.radius = _check_radius(radius, "Simplex")
        if dim is not None:
            if isinstance(dim, bool) or not isinstance(dim, int):
                raise TypeError(f"Simplex dim must be an int or None, got {type(dim).__name__}")
            if not -param.ndim <= dim < param.ndim:
                raise ValueError(f"Simplex dim must be in [{-param.ndim}, {param.ndim}) for a parameter of "
                                 f"shape {tuple(param.shape)}, got {dim}")
        size = param.numel() if dim is None else param.shape[dim]
        if size == 0:
            raise ValueError(f"Simplex slices of a parameter of shape {tuple(param.shape)} are empty, so no "
                             "point sums to the radius; expected at least one element per slice")
        self.dim = dim

    def _project(self, x: Tensor) -> Tensor:
        if self.dim is None:
            return _simplex_last(x.reshape(1, -1), self.radius).reshape(x.shape)
        return _simplex_last(x.movedim(self.dim, -1), self.radius).movedim(-1, self.dim)

    def _sum(self) -> Tensor:
        x = self.param
        return (x.sum() if self.dim is None else x.sum(self.dim)) - self.radius

    def _constraints(self, base: str) -> list[Constraint]:
        return [_nonnegative(self.param, f"{base}.nonneg"), eq(self._sum, name=f"{base}.sum")]

    def _options(self) -> str:
        return f"radius={self.radius}, dim={self.dim!r}"


class Sphere(Set):
    """``‖x − c‖₂ = r`` over the whole tensor (nonconvex); ``P(x) = c + r (x − c) / ‖x − c‖₂``.

    At ``x = c`` every point of the sphere is a projection; this returns ``c + r e₀`` (``e₀`` the first
    element, in flattened order).

    Args:
        param: the constrained tensor (at least one element).
        radius: ``r > 0``, finite.
        center: ``c``: ``None`` (zero), a float, or a tensor broadcastable to ``param.shape``.
        name: base constraint name.

    ``as_constraint``: one equality ``(‖x − c‖₂² − r²) / (2r)``.
    """

    convex = False

    def __init__(self, param: Tensor, radius: float = 1.0, center: float | Tensor | None = None,
                 name: str | None = None):
        super().__init__(param, name)
        if param.numel() == 0:
            raise ValueError("Sphere needs a parameter with at least one element, got an empty tensor")
        self.radius = _check_radius(radius, "Sphere")
        self.center = _as_field(0.0 if center is None else center, param, "center", "Sphere")
        if not torch.isfinite(self.center).all():
            raise ValueError("Sphere center must be finite (no NaN or inf)")

    def _project(self, x: Tensor) -> Tensor:
        c = _like(self.center, x)
        d = x - c
        norm = torch.linalg.vector_norm(d)
        e0 = torch.zeros_like(d).reshape(-1)
        e0[0] = 1
        at_center = norm == 0
        d = torch.where(at_center, e0.reshape(d.shape), d)
        norm = torch.where(at_center, torch.ones_like(norm), norm)
        return c + d * (self.radius / norm)

    def _value(self) -> Tensor:
        d = self.param - _like(self.center, self.param)
        r = self.radius
        return ((d * d).sum() - r * r) / (2 * r)

    def _constraints(self, base: str) -> list[Constraint]:
        return [eq(self._value, name=base)]

    def _options(self) -> str:
        return f"radius={self.radius}, center={_summary(self.center)}"


class Stiefel(Set):
    """Matrices ``W`` of shape ``(..., a, b)`` with orthonormal columns (``a >= b``: ``WᵀW = I_b``) or rows
    (``a < b``: ``WWᵀ = I_a``); leading dimensions are independent matrices. Nonconvex.

    ``P(W) = U Vᵀ`` for the thin SVD ``W = U Σ Vᵀ``: the polar factor, the nearest such matrix in Frobenius
    norm (unique when ``W`` has full rank).

    ``as_constraint``: one equality whose rows are the upper triangle, diagonal included, of ``G − I`` for
    every matrix, ``G`` the smaller Gram matrix (the lower triangle would repeat rows, which breaks
    constraint qualifications).
    """

    convex = False

    def __init__(self, param: Tensor, name: str | None = None):
        super().__init__(param, name)
        if param.ndim < 2:
            raise ValueError(f"Stiefel needs a parameter with at least 2 dimensions (..., a, b), got shape "
                             f"{tuple(param.shape)}")

    @property
    def _columns(self) -> bool:
        a, b = self.param.shape[-2:]
        return a >= b

    def _project(self, x: Tensor) -> Tensor:
        U, _, Vh = torch.linalg.svd(x, full_matrices=False)
        return U @ Vh

    def _gram_rows(self) -> Tensor:
        W = self.param
        G = W.mT @ W if self._columns else W @ W.mT
        k = G.shape[-1]
        i, j = torch.triu_indices(k, k, device=W.device)
        residual = G - torch.eye(k, dtype=W.dtype, device=W.device)
        return residual[..., i, j].reshape(-1)

    def _constraints(self, base: str) -> list[Constraint]:
        return [eq(self._gram_rows, name=base)]
