"""ConstrainedSQP and the QP solvers on a CUDA device, checked against the same runs on the CPU.

Every test carries the ``cuda`` marker and is skipped (with the reason) where ``torch.cuda.is_available()`` is
False; on a machine with a GPU, ``pytest -m cuda`` runs only these.
"""
import pytest
import torch

import constrained_optim as co
from constrained_optim.qp import solve_box_qp, solve_qp

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False")]

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _solve(device, dtype, memory):
    """min Σx⁴ + ‖x − 1‖²  s.t.  ‖x‖² = 1, x₀ >= 0, (0.7, −0.9, −0.9) <= x <= 0.9 (bounds by column; x₀ = 0.7
    at the solution), from (2, 0, −1)."""
    x = torch.tensor([2.0, 0.0, -1.0], dtype=dtype, device=device, requires_grad=True)
    lower = torch.tensor([0.7, -0.9, -0.9], dtype=dtype, device=device)
    cons = [co.eq(lambda: (x ** 2).sum() - 1, name="sphere"), co.ineq(lambda: -x[0], name="first"),
            co.Box(x, lower=lower, upper=0.9)]
    res = co.minimize(lambda: (x ** 4).sum() + ((x - 1) ** 2).sum(), [x], cons, memory=memory, max_iter=300)
    return res, x.detach()


@pytest.mark.parametrize("memory", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sqp_on_cuda_matches_cpu(dtype, memory):
    res_cuda, x_cuda = _solve(CUDA, dtype, memory)
    res_cpu, x_cpu = _solve(CPU, dtype, memory)
    assert res_cuda.success and res_cpu.success, (res_cuda.message, res_cpu.message)
    assert x_cuda.device.type == "cuda" and x_cuda.dtype == dtype
    assert all(lam.device.type == "cuda" for lam in res_cuda.multipliers.values())
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    assert torch.allclose(x_cuda.cpu(), x_cpu, atol=tol)
    assert res_cuda.fun == pytest.approx(res_cpu.fun, rel=tol)


def _batch(seed, batch=8, n=12):
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
    Q = B @ B.mT + 0.1 * torch.eye(n, dtype=torch.float64)
    return Q, torch.randn(batch, n, generator=gen, dtype=torch.float64), gen


def test_solve_box_qp_on_cuda_matches_cpu():
    Q, p, _ = _batch(0)
    cpu = solve_box_qp(Q, p, -0.5, 0.5)
    cuda = solve_box_qp(Q.to(CUDA), p.to(CUDA), -0.5, 0.5)
    assert cuda.z.device.type == "cuda" and bool(cuda.solved.all()) and bool(cpu.solved.all())
    assert torch.allclose(cuda.z.cpu(), cpu.z, atol=1e-8)


def test_solve_qp_on_cuda_matches_cpu():
    Q, p, gen = _batch(1)
    G = torch.randn(8, 5, 12, generator=gen, dtype=torch.float64)
    h = torch.rand(8, 5, generator=gen, dtype=torch.float64)
    A = torch.randn(8, 2, 12, generator=gen, dtype=torch.float64)
    b = 0.1 * torch.randn(8, 2, generator=gen, dtype=torch.float64)
    cpu = solve_qp(Q, p, G, h, A, b)
    cuda = solve_qp(*(t.to(CUDA) for t in (Q, p, G, h, A, b)))
    assert cuda.z.device.type == "cuda" and bool(cuda.solved.all()) and bool(cpu.solved.all())
    assert torch.allclose(cuda.z.cpu(), cpu.z, atol=1e-8)


def test_scale_benchmark_case_on_cuda_reports_device_memory():
    from test_benchmarks import scale_case
    r = scale_case("cuda", iters=2)
    assert r["device_peak"] > 0 and r["ratio_eval"] > 1


def test_robustness_benchmark_quick_mode_on_cuda_agrees_with_one_at_a_time():
    from test_benchmarks import load_benchmark
    pytest.importorskip("sklearn")
    outcome = load_benchmark("robustness_batch_bench").main(["--quick", "--device", "cuda"])
    assert outcome["valid"] and outcome["agree"]
