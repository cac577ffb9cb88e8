"""constrained_optim: constrained optimizers for PyTorch.

    minimize f(x)  subject to  c_I(x) <= 0,  c_E(x) = 0,  x_k ∈ S_k (simple sets)
"""
from .augmented_lagrangian import AugmentedLagrangian
from .batched import BatchedSQP
from .certificate import Certificate, OptimizeResult, Status
from .constraints import Constraint, eq, ineq
from .minimize import minimize
from .penalty import Penalty
from .plotting import plot_history
from .projected_gradient import ProjectedGradient
from .sets import Ball, Box, NonNegative, Set, Simplex, Sphere, Stiefel
from .sqp import ConstrainedSQP

__all__ = ["AugmentedLagrangian", "Ball", "BatchedSQP", "Box", "Certificate", "ConstrainedSQP", "Constraint", "NonNegative",
           "OptimizeResult", "Penalty", "ProjectedGradient", "Set", "Simplex", "Sphere", "Status", "Stiefel", "eq",
           "ineq", "minimize", "plot_history"]
__version__ = "0.1.0"
