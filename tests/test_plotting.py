"""plot_history: three stacked axes drawn from a real co.minimize history."""
import math
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import constrained_optim as co  # noqa: E402
from constrained_optim.certificate import OptimizeResult  # noqa: E402
from constrained_optim.plotting import plot_history  # noqa: E402


@pytest.fixture(scope="module")
def hs71():
    x = torch.tensor([1.0, 5.0, 5.0, 1.0], dtype=torch.float64, requires_grad=True)
    res = co.minimize(lambda: x[0] * x[3] * (x[0] + x[1] + x[2]) + x[2], [x],
                      [co.ineq(lambda: 25.0 - x.prod(), name="product"),
                       co.eq(lambda: (x ** 2).sum() - 40.0, name="sphere"),
                       co.ineq(lambda: 1.0 - x, name="lower"), co.ineq(lambda: x - 5.0, name="upper")],
                      max_iter=200)
    assert res.success and len(res.history) > 5
    return res


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _line(ax):
    assert len(ax.lines) == 1
    return np.asarray(ax.lines[0].get_xdata(), dtype=float), np.asarray(ax.lines[0].get_ydata(), dtype=float)


def _column(history, key):
    return np.array([entry[key] for entry in history], dtype=float)


def test_three_axes_with_the_history(hs71):
    fig = plot_history(hs71)
    assert isinstance(fig, matplotlib.figure.Figure)
    objective, violation, stationarity = fig.axes
    assert len(fig.axes) == 3
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "log", "log"]
    it = _column(hs71.history, "iteration")

    x, y = _line(objective)
    np.testing.assert_array_equal(x, it)
    np.testing.assert_array_equal(y, _column(hs71.history, "fun"))

    for ax, key in ((violation, "violation"), (stationarity, "stationarity")):
        values = _column(hs71.history, key)
        keep = np.isfinite(values) & (values > 0)
        x, y = _line(ax)
        np.testing.assert_array_equal(x, it[keep])
        np.testing.assert_array_equal(y, values[keep])
    # the axes share the iteration axis, and only the bottom one is labelled
    assert stationarity.get_xlabel() == "iteration"
    assert objective.get_shared_x_axes().joined(objective, stationarity)
    assert hs71.history[-1]["stationarity"] <= hs71.certificate.tol_opt


def test_nonfinite_and_zero_values_are_left_out_of_log_axes(hs71):
    history = [dict(entry) for entry in hs71.history[:6]]
    history[1]["stationarity"] = math.nan
    history[2]["stationarity"] = math.inf
    history[3]["violation"] = 0.0
    fig = plot_history(OptimizeResult(history=history))
    _, violation, stationarity = fig.axes
    np.testing.assert_array_equal(_line(stationarity)[0], [history[k]["iteration"] for k in (0, 3, 4, 5)])
    np.testing.assert_array_equal(_line(violation)[0], [history[k]["iteration"] for k in (0, 1, 2, 4, 5)])


def test_all_nan_stationarity_is_annotated():
    history = [{"iteration": k, "fun": 1.0 / (k + 1), "violation": 0.1 ** k, "stationarity": math.nan}
               for k in range(4)]
    fig = plot_history({"history": history})
    texts = [t.get_text() for t in fig.axes[2].texts]
    assert texts == ["no positive finite values"]


def test_saves_to_path(hs71, tmp_path):
    for name in ("history.png", "history.pdf"):
        path = tmp_path / name
        fig = plot_history(hs71, path=str(path))
        assert isinstance(fig, matplotlib.figure.Figure)
        assert path.stat().st_size > 1000
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "history.pdf").read_bytes()[:5] == b"%PDF-"


def test_accepts_an_object_with_a_history_attribute(hs71):
    class Run:
        history = hs71.history

    assert len(plot_history(Run()).axes) == 3


@pytest.mark.parametrize("result", [object(), {"x": 1}, None, [1, 2, 3]])
def test_no_history_is_a_type_error(result):
    with pytest.raises(TypeError, match="history"):
        plot_history(result)


@pytest.mark.parametrize("history, error", [
    ("abc", TypeError), (5, TypeError), ([1.0], TypeError), ([{"iteration": 0, "fun": 1.0}], TypeError),
    ([], ValueError),
])
def test_malformed_history(history, error):
    with pytest.raises(error, match="history"):
        plot_history({"history": history})


def test_missing_matplotlib_gives_install_hint(hs71, monkeypatch):
    # a None entry in sys.modules makes the import raise ImportError, as if matplotlib were not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_history(hs71)


def test_import_does_not_import_matplotlib():
    code = ("import sys, constrained_optim, constrained_optim.plotting; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'); print(bad); assert not bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
