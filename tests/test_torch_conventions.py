"""torch.optim conventions for the four optimizers: checkpoint/resume through a file, LR schedulers, step
hooks, parameter groups, zero_grad, and mismatched checkpoints."""
import pytest
import torch

import constrained_optim as co

F64 = torch.float64
TARGET = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
CONFIGS = ["sqp", "sqp-lbfgs", "alm-adam", "alm-lbfgs", "penalty-adam", "pgd-fixed", "pgd-adam", "pgd-spg", "pgd-apgd"]


def _problem():
    x = torch.tensor([3.0, -1.0, 0.5], dtype=F64, requires_grad=True)
    return x, [co.ineq(lambda: x.sum() - 1.0, name="budget"), co.Ball(x, 2.0, name="ball")]


def _build(config, x, cons):
    ball = [cons[1]]
    return {
        "sqp": lambda: co.ConstrainedSQP([x], cons),
        "sqp-lbfgs": lambda: co.ConstrainedSQP([x], cons, memory=2),
        "alm-adam": lambda: co.AugmentedLagrangian([x], cons, lr=0.05, update_every=3, penalty_growth=2.0),
        "alm-lbfgs": lambda: co.AugmentedLagrangian([x], cons, optimizer=torch.optim.LBFGS, update_every=1,
                                                    penalty_growth=10.0),
        "penalty-adam": lambda: co.Penalty([x], cons, lr=0.05, update_every=3),
        "pgd-fixed": lambda: co.ProjectedGradient([x], ball, lr=0.01),
        "pgd-adam": lambda: co.ProjectedGradient([x], ball, optimizer=torch.optim.Adam, lr=0.05),
        "pgd-spg": lambda: co.ProjectedGradient([x], ball, step="spg"),
        "pgd-apgd": lambda: co.ProjectedGradient([x], ball, step="apgd", apgd_steps=20, lr=0.5),
    }[config]()


def _run(config, steps, tmp_path=None, save_at=None):
    x, cons = _problem()
    opt = _build(config, x, cons)

    def closure():
        opt.zero_grad()
        loss = ((x - TARGET) ** 4).sum()
        loss.backward()
        return loss
    for k in range(steps):
        if k == save_at:
            path = tmp_path / "checkpoint.pt"
            torch.save({"optimizer": opt.state_dict(), "x": x.detach().clone()}, path)
            del opt, x, cons
            checkpoint = torch.load(path)       # weights_only=True: the state is plain tensors and values
            x, cons = _problem()
            opt = _build(config, x, cons)
            with torch.no_grad():
                x.copy_(checkpoint["x"])
            opt.load_state_dict(checkpoint["optimizer"])
        opt.step(closure)
    return x.detach().clone(), opt


@pytest.mark.parametrize("config", CONFIGS)
def test_resume_from_a_checkpoint_file_repeats_the_run_exactly(config, tmp_path):
    straight, opt = _run(config, 12)
    resumed, _ = _run(config, 12, tmp_path, save_at=5)
    assert torch.equal(straight, resumed)
    assert not torch.equal(straight, _problem()[0].detach())        # the run moved
    assert opt.certificate.iteration >= 1


def _step_lengths_with_scheduler(opt, x, scheduler, steps):
    """Per step: (x_new − x_old, grad used, lr)."""
    out = []
    for _ in range(steps):
        lr = opt.param_groups[0]["lr"]
        before = x.detach().clone()

        def closure():
            opt.zero_grad()
            loss = ((x - TARGET) ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        out.append((x.detach() - before, x.grad.detach().clone(), lr))
        scheduler.step()
    return out


def test_lr_scheduler_sets_the_inner_step_of_the_augmented_lagrangian():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = co.AugmentedLagrangian([x], [co.ineq(lambda: x.sum() - 10.0)], optimizer=torch.optim.SGD, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    records = _step_lengths_with_scheduler(opt, x, scheduler, 4)
    assert [lr for _, _, lr in records] == [0.1, 0.05, 0.025, 0.0125]
    for dx, grad, lr in records:              # SGD: x ← x − lr (∇f + Jᵀw), with the scheduled lr
        assert torch.allclose(dx, -lr * grad, rtol=0, atol=1e-15)


def test_lr_scheduler_sets_the_projected_gradient_step():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = co.ProjectedGradient([x], [co.Box(x, -100.0, 100.0)], lr=0.1)    # the box stays inactive
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    records = _step_lengths_with_scheduler(opt, x, scheduler, 4)
    assert [lr for _, _, lr in records] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    for dx, grad, lr in records:
        assert torch.allclose(dx, -lr * grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize("config", ["sqp", "alm-adam", "penalty-adam", "pgd-spg"])
def test_step_hooks_fire_once_per_step(config):
    x, cons = _problem()
    opt = _build(config, x, cons)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    opt.step(closure)
    assert calls == ["pre", "post", "pre", "post"]


@pytest.mark.parametrize("config", ["sqp", "alm-adam", "pgd-fixed"])
def test_zero_grad(config):
    x, cons = _problem()
    opt = _build(config, x, cons)
    (x ** 2).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert torch.equal(x.grad, torch.zeros_like(x))
    opt.zero_grad()
    assert x.grad is None


def test_sqp_optimizes_several_parameter_groups_jointly():
    a = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    b = torch.tensor([0.0], dtype=F64, requires_grad=True)
    opt = co.ConstrainedSQP([{"params": [a]}, {"params": [b]}], [co.eq(lambda: a.sum() + b.sum() - 1.0)])
    _solve_split_problem(opt, a, b, _split_closure(opt, a, b))


def _split_closure(opt, a, b):
    def closure():
        opt.zero_grad()
        loss = (a ** 2).sum() + (b ** 2).sum()
        loss.backward()
        return loss
    return closure


def _solve_split_problem(opt, a, b, closure):
    """min ‖a‖² + ‖b‖² s.t. Σa + Σb = 1 over a ∈ R², b ∈ R: every entry 1/3."""
    for _ in range(20):
        opt.step(closure)
        if opt.certificate.converged:
            break
    assert opt.certificate.converged
    assert torch.allclose(torch.cat([a, b]).detach(), torch.full((3,), 1 / 3, dtype=F64), atol=1e-8)


def test_sqp_parameter_group_cannot_override_global_options():
    a = torch.ones(2, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="global.*mu0"):
        co.ConstrainedSQP([{"params": [a], "mu0": 0.5}], [co.eq(lambda: a.sum())])


def test_sqp_add_param_group_restarts_on_the_enlarged_problem():
    a = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    b = torch.tensor([5.0], dtype=F64, requires_grad=True)
    opt = co.ConstrainedSQP([a], [co.eq(lambda: a.sum() + b.sum() - 1.0)])
    closure = _split_closure(opt, a, b)
    opt.step(closure)
    opt.step(closure)
    opt.add_param_group({"params": [b]})
    assert opt.certificate.iteration == 0          # restarted
    _solve_split_problem(opt, a, b, closure)


def test_augmented_lagrangian_add_param_group_reaches_the_inner_optimizer():
    a = torch.ones(2, dtype=F64, requires_grad=True)
    b = torch.ones(2, dtype=F64, requires_grad=True)
    opt = co.AugmentedLagrangian([a], [co.ineq(lambda: a.sum() - 1.0)], optimizer=torch.optim.SGD, lr=0.1)
    opt.add_param_group({"params": [b], "lr": 0.01})
    assert opt.inner.param_groups is opt.param_groups and len(opt.param_groups) == 2
    opt.step(_split_closure(opt, a, b))
    assert torch.allclose(b.detach(), torch.full((2,), 1 - 0.01 * 2, dtype=F64))     # b: lr 0.01, ∇ = 2b


# ------------------------------------------------------------------------------- mismatched checkpoints
def _sqp_after(steps, memory=None, n=3):
    x = torch.linspace(1.0, 2.0, n, dtype=F64).requires_grad_()
    opt = co.ConstrainedSQP([x], [co.ineq(lambda: x.sum() - 1.0)], memory=memory)

    def closure():
        opt.zero_grad()
        loss = ((x - 3.0) ** 2).sum()
        loss.backward()
        return loss
    for _ in range(steps):
        opt.step(closure)
    return x, opt, closure


@pytest.mark.parametrize("corrupt", ["not a dict", "missing key", "other size", "other memory", "nan point",
                                     "bad sample", "missing entry"])
def test_mismatched_or_corrupt_sqp_state_dict_raises_and_changes_nothing(corrupt):
    _, donor, _ = _sqp_after(2)
    good = donor.state_dict()
    if corrupt == "not a dict":
        bad = [good]
    elif corrupt == "missing key":
        bad = {k: v for k, v in good.items() if k != "param_groups"}
    elif corrupt == "other size":
        bad = _sqp_after(2, n=4)[1].state_dict()
    elif corrupt == "other memory":
        bad = _sqp_after(2, memory=3)[1].state_dict()
    elif corrupt == "nan point":
        bad = dict(good, state=dict(good["state"], x=torch.full((3,), float("nan"), dtype=F64)))
    elif corrupt == "bad sample":
        bad = dict(good, state=dict(good["state"], samples=[[torch.zeros(2, dtype=F64)] * 3]))
    else:
        bad = dict(good, state={k: v for k, v in good["state"].items() if k != "mu"})
    x, opt, closure = _sqp_after(1)
    x_ref, ref, closure_ref = _sqp_after(1)
    with pytest.raises(ValueError, match="state_dict does not match"):
        opt.load_state_dict(bad)
    for _ in range(5):                        # the optimizer carries on as if nothing had been tried
        opt.step(closure)
        ref.step(closure_ref)
    assert torch.equal(x.detach(), x_ref.detach())


@pytest.mark.parametrize("config", ["alm-adam", "penalty-adam", "pgd-adam"])
@pytest.mark.parametrize("corrupt", ["not a dict", "no inner", "other groups", "inner of another optimizer"])
def test_mismatched_first_order_state_dict_raises_and_changes_nothing(config, corrupt):
    _, donor = _run(config, 3)
    good = donor.state_dict()
    if corrupt == "not a dict":
        bad = None
    elif corrupt == "no inner":
        bad = {k: v for k, v in good.items() if k != "inner"}
    elif corrupt == "other groups":
        bad = dict(good, param_groups=good["param_groups"] * 2)
    else:
        sgd = torch.optim.SGD([torch.zeros(3, requires_grad=True), torch.zeros(1, requires_grad=True)], lr=0.1)
        bad = dict(good, inner=sgd.state_dict())
    _, opt = _run(config, 2)
    _, ref = _run(config, 2)
    x, x_ref = opt.param_groups[0]["params"][0], ref.param_groups[0]["params"][0]
    with pytest.raises(ValueError, match="state_dict does not match"):
        opt.load_state_dict(bad)
    for o, p in ((opt, x), (ref, x_ref)):
        def closure(o=o, p=p):
            o.zero_grad()
            loss = ((p - TARGET) ** 4).sum()
            loss.backward()
            return loss
        for _ in range(3):
            o.step(closure)
    assert torch.equal(x, x_ref)


def test_sqp_after_a_terminal_status_still_calls_the_closure_once_and_changes_nothing():
    """Lightning's automatic optimization requires every step to run its closure."""
    x = torch.tensor([1.0, 1.0], dtype=F64, requires_grad=True)
    opt = co.ConstrainedSQP([x], [co.ineq(lambda: x.sum() - 2.0)])
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        opt.zero_grad()
        loss = ((x - 2) ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    assert opt.certificate.converged                 # the start is the optimum
    before, n = x.detach().clone(), calls["n"]
    loss = opt.step(closure)
    assert calls["n"] == n + 1 and float(loss) == pytest.approx(2.0)
    assert torch.equal(x.detach(), before) and opt.certificate.converged and opt.nfev == n


@pytest.mark.parametrize("config", ["alm-adam", "penalty-adam", "pgd-fixed"])
def test_closure_returning_none_after_backward_is_accepted(config):
    """Lightning's manual optimization passes a closure that returns None (the user already ran backward)."""
    x, cons = _problem()
    opt = _build(config, x, cons)
    ((x - TARGET) ** 4).sum().backward()
    before = x.detach().clone()
    opt.step(lambda: None)
    assert not torch.equal(x.detach(), before)
    x2, cons2 = _problem()
    opt2 = _build(config, x2, cons2)
    ((x2 - TARGET) ** 4).sum().backward()
    opt2.step()
    assert torch.equal(x.detach(), x2.detach())          # the same step as step() without a closure
    with pytest.raises(TypeError, match="NoneType"):
        opt.zero_grad()
        opt.step(lambda: None)                             # None and no backward: nothing to step on
