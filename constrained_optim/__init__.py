"""constrained_optim: constrained optimizers for PyTorch.

    minimize f(x)  subject to  c_I(x) <= 0,  c_E(x) = 0
"""
from .certificate import Certificate, OptimizeResult, Status
from .constraints import Constraint, eq, ineq
from .minimize import minimize
from .sqp import ConstrainedSQP

__all__ = ["Certificate", "ConstrainedSQP", "Constraint", "OptimizeResult", "Status", "eq", "ineq", "minimize"]
__version__ = "0.1.0"
