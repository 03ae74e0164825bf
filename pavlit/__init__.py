"""pavlit: process advantage verifiers (Setlur et al., 2024) on PyTorch Lightning."""

from pavlit.interfaces import Problem, Prover, Reward, Search, Task

__version__ = "0.1.0"

__all__ = ["Problem", "Prover", "Reward", "Search", "Task", "__version__"]
