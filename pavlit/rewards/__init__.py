"""Reward compositions for test-time search (``pavlit.rewards`` plugins; docs/method.md §5).

=========== ==================== ==============================================================================
name        class                score of a prefix ``s`` (``value`` = the composition's ``Q̂^π(s)``)
=========== ==================== ==============================================================================
``orm``     :class:`ORMReward`   the outcome verifier's P(correct) of the text so far
``pqv``     :class:`PQVReward`   ``Q̂^π(s)`` from the process verifier (α = 0)
``pav``     :class:`PAVReward`   ``Q̂^π(s) + α·(Q̂^μ(s) − Q̂^μ(parent))``, ``Q̂^μ`` from a prover (Best-of-K default)
``mc``      :class:`MCReward`    the same quantities by Monte-Carlo rollouts of π (an oracle; expensive)
=========== ==================== ==============================================================================
"""

from pavlit.rewards.mc import MCReward
from pavlit.rewards.verifiers import ORMReward, PAVReward, PQVReward, PrefixScorer, ResponseScorer, load_verifier

__all__ = ["MCReward", "ORMReward", "PAVReward", "PQVReward", "PrefixScorer", "ResponseScorer", "load_verifier"]
