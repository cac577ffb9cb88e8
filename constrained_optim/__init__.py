"""constrained_optim: constrained optimizers for PyTorch."""
