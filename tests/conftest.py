"""Make ``tests/`` importable (``from problems import ...``)."""
import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


# The qpth-backend tests need the optional qpth package, which CI installs without its dependencies
# (`pip install --no-deps qpth`: no cvxpy) and then runs with `pytest -m qpth`. Without qpth they are
# deselected, and the summary says so; selected explicitly without qpth they fail.
def _qpth_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("qpth") is not None


def pytest_collection_modifyitems(config, items):
    if _qpth_installed() or config.getoption("-m"):
        return
    qpth = [item for item in items if item.get_closest_marker("qpth")]
    if qpth:
        config.hook.pytest_deselected(items=qpth)
        items[:] = [item for item in items if not item.get_closest_marker("qpth")]
        config._qpth_deselected = len(qpth)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    count = getattr(config, "_qpth_deselected", 0)
    if count:
        terminalreporter.write_line(f"{count} qpth-backend tests deselected: qpth is not installed "
                                    "(pip install --no-deps qpth, then pytest -m qpth)")


def require_qpth() -> None:
    """In a qpth test: fail (never skip) when the optional package is missing."""
    assert _qpth_installed(), "qpth is not installed: pip install --no-deps qpth"


@pytest.fixture(scope="module")
def one_thread():
    """Small problems: torch's intra-op threads only add overhead, and on a shared 2-core machine they can
    make these runs several times slower (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
