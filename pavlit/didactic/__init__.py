"""The didactic replication of docs/method.md §7: an autoregressive MLP policy on the planted task, SFT then RL with
the effective reward ``Q^π + α·A^μ`` of a γ-prover, and the Theorem 3.1 quantities that rank provers before RL."""

from pavlit.didactic.policy import MLPPolicy, action_mask

__all__ = ["MLPPolicy", "action_mask"]
