"""Test-time search strategies (``pavlit.search`` plugins; docs/method.md §5) and the ``pavlit search`` job.

=============== ==================== ==========================================================================
name            class                what it does at budget N (or B)
=============== ==================== ==========================================================================
``best_of_n``   :class:`BestOfN`     N full samples; pick by reward, majority vote, weighted vote (+ Pass@N)
``beam``        :class:`BeamSearch`  step-level beam of width B, C children per state, global top-B
``dvts``        :class:`DVTS`        N / M independent greedy subtrees with M children per state
=============== ==================== ==========================================================================

Tree searches run all problems of a batch in lockstep: one sampler call and one reward call per depth.
"""

from pavlit.search.best_of_n import BestOfN
from pavlit.search.tree import DVTS, BeamSearch, TreeSearch

__all__ = ["DVTS", "BeamSearch", "BestOfN", "TreeSearch"]
