"""What ``pavlit search`` compares: its methods (strategy + reward), the α sweep, and the efficiency ratio's lines.

These are the config groups of :func:`pavlit.search.job.search` (``methods:``, ``alpha_sweep:``, ``efficiency:``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pavlit.interfaces import SPLITS, Reward, Search
from pavlit.jobs.args import check_num_problems

__all__ = ["AlphaSweep", "Efficiency", "Method", "check_budgets"]


@dataclass
class Method:
    """One line of the comparison: a strategy with a reward composition.

    Args:
        name: The method's label in the table and plot (e.g. ``orm_bon``, ``pav_beam``).
        search: The strategy (``BestOfN``, ``BeamSearch``, ``DVTS``, or a plugin).
        reward: The reward composition (``ORMReward``, ``PQVReward``, ``PAVReward``, ``MCReward``, or a plugin);
            ``None`` only for best-of-N by majority vote.
        budgets: This method's budgets (default, or ``null``: the job's), e.g. smaller widths for beam search,
            which spends about C·B step samples per depth. An empty list is refused.
    """

    name: str
    search: Search
    reward: Reward | None = None
    budgets: list[int] | None = None


@dataclass
class AlphaSweep:
    """Choose α on a validation split before the test run (docs/method.md §5: α over [0, 1] in steps of 0.1).

    Args:
        method: The method whose reward's ``alpha`` is tuned.
        alphas: The values tried.
        split: Where they are tried (never the test split).
        num_problems: Use only the first problems of the split.
        budgets: Budgets tried per α (default: the method's); the choice maximises the mean accuracy over them.
        apply_to: Other methods whose reward gets the chosen α too.
    """

    method: str
    alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    split: str = "validation"
    num_problems: int | None = None
    budgets: list[int] | None = None
    apply_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.alphas:
            raise ValueError("AlphaSweep.alphas must not be empty")
        if self.split not in SPLITS or self.split == "test":
            raise ValueError(f"AlphaSweep.split must be 'train' or 'validation', got {self.split!r}")
        bad = [a for a in self.alphas if not math.isfinite(a)]
        if bad:
            raise ValueError(f"AlphaSweep.alphas must be finite numbers, got {bad}")
        check_num_problems("AlphaSweep.num_problems", self.num_problems)
        if self.budgets is not None:
            check_budgets("AlphaSweep.budgets", self.budgets)


@dataclass
class Efficiency:
    """Which lines the compute-efficiency ratio compares (method names; a pick as ``name [pick]``).

    A name that is not one of the job's methods is refused before anything runs.

    Args:
        baseline: Default: the first best-of-N method with an ``orm`` reward.
        target: Default: the first beam-search method with a ``pav`` reward.
    """

    baseline: str | None = None
    target: str | None = None


def check_budgets(field: str, budgets: list[int]) -> None:
    """Budgets are a non-empty list of distinct positive integers (a repeated one would be run and counted twice)."""
    if not budgets:
        raise ValueError(f"{field} must not be empty")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in budgets):
        raise ValueError(f"{field} must be >= 1, got {list(budgets)}")
    repeated = sorted({b for b in budgets if list(budgets).count(b) > 1})
    if repeated:
        raise ValueError(f"{field} must be distinct, got {list(budgets)} ({repeated} repeated)")
