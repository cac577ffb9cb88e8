"""Convergence plots of a :func:`~constrained_optim.minimize` run (needs matplotlib: ``pip install matplotlib``).

matplotlib is imported when :func:`plot_history` is called, never by ``import constrained_optim``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

_PANELS = (("fun", "objective f", "linear"),
           ("violation", "max violation", "log"),
           ("stationarity", "stationarity", "log"))


def plot_history(result: Any, path: str | None = None):
    """Plot the objective, the violation and the stationarity of each iteration of a run.

    Three stacked axes share the iteration axis: the objective ``fun`` (linear scale), the max violation
    ``violation`` (log scale) and the relative KKT residual ``stationarity`` (log scale). On the log axes
    the iterations whose value is not finite (stationarity is NaN where it was not measured) or not
    positive (an exactly feasible point has violation 0, which a log axis cannot show) are left out;
    an axis with no such value says so in its middle.

    Args:
        result: a :class:`~constrained_optim.OptimizeResult` (or any mapping or object with a ``history``:
            a non-empty list of dicts with ``iteration``, ``fun``, ``violation`` and ``stationarity``, as
            ``minimize`` records them).
        path: if given, the figure is also saved there (the format follows the extension, e.g. ``.png``,
            ``.pdf``).

    Returns:
        the ``matplotlib.figure.Figure``, created through ``pyplot`` so that ``plt.show()`` and notebooks
        display it; its axes are ``fig.axes`` (objective, violation, stationarity). Close it with
        ``plt.close(fig)`` when you make many.

    Raises:
        TypeError: ``result`` has no history, or an entry is not a dict with those keys.
        ValueError: the history is empty.
        ImportError: matplotlib is not installed.
    """
    history = _history(result)
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_history needs matplotlib: pip install matplotlib "
                          "(or pip install 'constrained_optim[plot]')") from err

    iterations = [float(entry["iteration"]) for entry in history]
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(6.4, 7.2), layout="constrained")
    for ax, (key, label, scale) in zip(axes, _PANELS):
        values = [float(entry[key]) for entry in history]
        if scale == "log":
            kept = [(i, v) for i, v in zip(iterations, values) if math.isfinite(v) and v > 0]
        else:
            kept = list(zip(iterations, values))
        ax.plot([i for i, _ in kept], [v for _, v in kept], marker=".", label=label)
        ax.set_yscale(scale)
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)
        if not kept:
            ax.text(0.5, 0.5, f"no {'positive finite ' if scale == 'log' else ''}values", transform=ax.transAxes,
                    ha="center", va="center")
    axes[-1].set_xlabel("iteration")
    axes[0].set_title("convergence history")
    if path is not None:
        fig.savefig(path)
    return fig


def _history(result: Any) -> list[Mapping]:
    if isinstance(result, Mapping):
        history = result.get("history")
    else:
        history = getattr(result, "history", None)
    if history is None:
        raise TypeError(f"plot_history needs a result with a history (co.minimize's OptimizeResult), "
                        f"got a {type(result).__name__} without one")
    if not isinstance(history, Sequence) or isinstance(history, (str, bytes)):
        raise TypeError(f"result.history must be a list of dicts, got a {type(history).__name__}")
    if len(history) == 0:
        raise ValueError("result.history is empty: there is nothing to plot")
    for k, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise TypeError(f"result.history[{k}] must be a dict, got a {type(entry).__name__}")
        missing = [key for key in ("iteration", "fun", "violation", "stationarity") if key not in entry]
        if missing:
            raise TypeError(f"result.history[{k}] lacks the keys {missing}")
    return list(history)
