"""Data-parallel runs (torch.distributed, gloo, 2 CPU processes started with torch.multiprocessing.spawn).

Each optimizer runs under DistributedDataParallel on two shards of one dataset; both ranks must end with
identical parameters and certificates, equal (1e-10, float64) to a single-process run on the concatenated
data (see ``distributed_problems.py`` for the problems). One spawn runs all optimizers; a failing rank must
end the run with an error, not a hang.
"""
import math
import os
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

import constrained_optim as co
import distributed_problems as dp

KINDS = ["sqp", "alm", "alm_fused", "penalty", "pgd", "local"]


def _rendezvous() -> str:
    """A fresh path for the file store of one spawned group (the file must not exist yet)."""
    handle, path = tempfile.mkstemp(prefix="co_ddp_")
    os.close(handle)
    os.remove(path)
    return path


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(dp.worker, args=(_rendezvous(), str(out), KINDS), nprocs=dp.WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(dp.WORLD)]


def _same_certificate(a: dict, b: dict) -> None:
    for key in ("stationarity", "complementarity", "ineq_violation", "eq_violation", "objective", "penalty", "status",
                "iteration"):
        assert a[key] == b[key] or (isinstance(a[key], float) and math.isnan(a[key]) and math.isnan(b[key])), key
    assert a["violations"] == b["violations"]
    assert a["multipliers"].keys() == b["multipliers"].keys()
    for name in a["multipliers"]:
        assert torch.equal(a["multipliers"][name], b["multipliers"][name]), name


@pytest.mark.parametrize("kind", ["sqp", "alm", "alm_fused", "penalty", "pgd"])
def test_ranks_agree_and_match_the_single_process_run(ranks, kind):
    r0, r1 = ranks[0][kind], ranks[1][kind]
    assert torch.equal(r0["x"], r1["x"]), "the ranks took different steps"
    _same_certificate(r0["cert"], r1["cert"])
    x_ref, cert_ref = dp.reference(kind)
    assert (r0["x"] - x_ref).abs().max() <= 1e-10
    assert r0["cert"]["status"] == cert_ref.status
    assert abs(r0["cert"]["objective"] - cert_ref.objective) <= 1e-10 * max(1.0, abs(cert_ref.objective))
    for key in ("ineq_violation", "eq_violation"):
        assert abs(r0["cert"][key] - getattr(cert_ref, key)) <= 1e-10
    # the problem moved: a test that compared two runs that stand still would prove nothing
    assert (x_ref - torch.cat([p.detach().reshape(-1) for p in dp.model().parameters()])).abs().max() > 1e-2


def test_data_parallel_sqp_is_certified(ranks):
    cert = ranks[0]["sqp"]["cert"]
    assert cert["status"] == co.Status.CONVERGED
    assert cert["stationarity"] <= 1e-8 and cert["ineq_violation"] <= 1e-8 and cert["eq_violation"] <= 1e-8


def test_reduced_values_and_jacobian_are_those_of_the_whole_data(ranks):
    """mean, sum and max rows: values and gradients equal to the single-process ones on all the data."""
    c_ref, J_ref = dp.values_at_start(dp.data()[0], dp.model())
    for rank in ranks:
        c, J = rank["values"]
        assert torch.allclose(c, c_ref, rtol=0, atol=1e-12)
        assert torch.allclose(J, J_ref, rtol=0, atol=1e-12)
    # the shards really differ (else the reductions would be untested)
    c0, _ = dp.values_at_start(dp.shard(0)[0], dp.model())
    c1, _ = dp.values_at_start(dp.shard(1)[0], dp.model())
    assert (c0[:3] - c1[:3]).abs().min() > 1e-3


def test_process_group_false_communicates_nothing(ranks):
    """Each rank solved its own shard's problem, exactly as a lone process does."""
    for rank, result in enumerate(ranks):
        x_ref, _ = dp.reference("local", rank)
        assert torch.equal(result["local"]["x"], x_ref)
    assert not torch.equal(ranks[0]["local"]["x"], ranks[1]["local"]["x"])


@pytest.mark.parametrize("kind", ["sqp", "alm"])
def test_unsynchronized_gradients_are_an_error_on_every_rank(tmp_path, kind):
    mp.spawn(dp.unsynced_worker, args=(_rendezvous(), str(tmp_path), kind), nprocs=dp.WORLD)
    for r in range(dp.WORLD):
        message = (tmp_path / f"rank{r}.txt").read_text()
        assert "differ between the 2 ranks" in message and "DistributedDataParallel" in message, message


def test_a_failing_rank_ends_the_run_without_a_hang(tmp_path):
    start = time.perf_counter()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed on purpose"):
        mp.spawn(dp.failing_worker, args=(_rendezvous(), str(tmp_path)), nprocs=dp.WORLD)
    assert time.perf_counter() - start < 60


def test_no_communication_without_a_process_group(monkeypatch):
    """Not distributed: no collective is ever called."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was called outside a distributed run")
    for name in ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor"):
        monkeypatch.setattr(torch.distributed, name, forbidden)
    for kind in ("sqp", "alm", "alm_fused", "penalty", "pgd"):
        x, cert = dp.reference(kind)
        assert torch.isfinite(x).all() and cert.iteration > 0


def test_bad_options():
    lin = dp.model()
    with pytest.raises(ValueError, match="reduce must be one of"):
        co.ineq(lambda: lin.weight.sum(), reduce="median")
    with pytest.raises(TypeError, match="process_group must be"):
        co.AugmentedLagrangian(lin.parameters(), [co.ineq(lambda: lin.weight.sum())], process_group="world")
    with pytest.raises(TypeError, match="process_group must be"):
        co.ConstrainedSQP(lin.parameters(), [co.ineq(lambda: lin.weight.sum())], process_group=True)
    assert "reduce='max'" in repr(co.ineq(lambda: lin.weight.sum(), name="w", reduce="max"))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["alm", "sqp"])
def test_lightning_ddp_two_cpu_processes(optimizer, tmp_path):
    """Trainer(strategy="ddp", devices=2, accelerator="cpu"): the example's own checks (identical parameters
    and certificates on both ranks, feasible / certified, ConstraintMonitor metrics in the CSV log)."""
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "lightning_ddp.py")
    env = dict(os.environ, CO_DDP_LOG_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, script, "--quick", "--optimizer", optimizer], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 CPU processes" in result.stdout
    assert "FAIL" not in result.stdout
