"""The research examples run in CI: ``main(["--quick"])`` of each returns 0. Each example checks its own
answer (lenet_alm: test accuracy and spectral-norm violation of the constrained LeNet; fairness: the
minibatch augmented Lagrangian's violation and loss gap to the certified full-batch optimum; physics: the
SQP's feasibility to 1e-8 and its loss against the soft penalty's). lenet_alm needs scikit-learn (its digits
data); without it main returns 2 and says so."""
import importlib
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("name", ["lenet_alm", "fairness", "physics"])
def test_example_quick(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    assert importlib.import_module(name).main(["--quick"]) == 0
