"""A fixed-checkpoint prover: another model μ (e.g. a weaker SFT checkpoint) whose own rollouts define ``Q^μ``.

Unlike Best-of-K, ``Q^μ`` of a checkpoint prover does not follow from ``Q^π``: it needs its own estimates
(docs/method.md §2). pavlit gets them the same way it gets ``Q^π``:

1. label π's prefixes with μ's completions too — ``pavlit label`` with ``provers: {weak: <model source>}`` writes
   records with ``policy: weak``;
2. train a Q-model on those records — ``pavlit fit --config configs/tiny/pav.yaml --data.init_args.policy weak``;
3. point this prover at the exported verifier (``verifier_path``), or, without a trained Q-model, estimate by
   direct Monte-Carlo rollouts of μ (:meth:`CheckpointProver.estimate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from pavlit.interfaces import Problem, Prover, Task
from pavlit.policy.sources import ModelSource

if TYPE_CHECKING:
    from pavlit.policy.sampler import Sampler

__all__ = ["CheckpointProver"]


class CheckpointProver(Prover):
    """A fixed model μ as the prover.

    Args:
        verifier_path: An exported PAV (``PAVModule.save_pretrained``) trained on μ's labels; scores ``Q^μ``.
        policy: μ itself, for Monte-Carlo estimates (:meth:`estimate`); optional when ``verifier_path`` is set.
        batch_size: Responses per verifier forward pass.
    """

    def __init__(self, verifier_path: str | None = None, policy: ModelSource | None = None, batch_size: int = 64):
        if verifier_path is None and policy is None:
            raise ValueError("CheckpointProver needs verifier_path (a Q-model of the prover) or policy (its model)")
        self.verifier_path = verifier_path
        self.policy = policy
        self.batch_size = batch_size
        self._verifier: Any = None
        self._sampler: Sampler | None = None

    @property
    def verifier(self) -> Any:
        """The prover's Q-model, loaded on first use."""
        if self._verifier is None:
            if self.verifier_path is None:
                raise ValueError("CheckpointProver.q_values needs verifier_path; without it use estimate(...)")
            from pavlit.models.verifier import Verifier

            self._verifier = Verifier.from_pretrained(self.verifier_path, kind="pav")
        return self._verifier

    def q_values(
        self,
        q_pi: torch.Tensor,
        prefixes: Sequence[Sequence[str]] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``Q^μ`` of each prefix from the prover's Q-model (``q_pi`` gives only the output's shape).

        Consecutive prefixes that extend each other by one step (the usual layout: every prefix ``h = 0..H`` of
        a response) are scored with one forward pass over the deepest of them.
        """
        if prefixes is None or prompts is None:
            raise ValueError("CheckpointProver needs the prefixes and their prompts to score them")
        if not len(prefixes) == len(prompts) == q_pi.numel():
            raise ValueError(f"got {len(prefixes)} prefixes and {len(prompts)} prompts for {q_pi.numel()} values")
        chains: list[tuple[str, list[str], int]] = []  # (prompt, deepest steps, how many prefixes it covers)
        for prompt, steps in zip(prompts, prefixes):
            steps = list(steps)
            if chains:
                last_prompt, last_steps, count = chains[-1]
                if prompt == last_prompt and steps[:-1] == last_steps and len(steps) == len(last_steps) + 1:
                    chains[-1] = (prompt, steps, count + 1)
                    continue
            chains.append((prompt, steps, 1))
        scores = self.verifier.score_prefixes([c[0] for c in chains], [c[1] for c in chains], self.batch_size)
        values = torch.cat([row[-count:] for row, (_, _, count) in zip(scores, chains)])
        dtype = q_pi.dtype if q_pi.is_floating_point() else torch.get_default_dtype()
        return values.to(dtype=dtype, device=q_pi.device).reshape(q_pi.shape)

    def rollout_sampler(self, task: Task) -> Sampler:
        """A sampler of the prover's own model (built once), for Monte-Carlo estimates of ``Q^μ``."""
        if self.policy is None:
            raise ValueError("CheckpointProver needs policy (the prover's model source) to roll the prover out")
        if self._sampler is None:
            from pavlit.policy.sampler import Sampler

            model, tokenizer = self.policy.load()
            self._sampler = Sampler(model, tokenizer, delimiter=task.step_delimiter)
        return self._sampler

    def estimate(
        self,
        task: Task,
        problem: Problem,
        prefixes: Sequence[Sequence[str]],
        n_rollouts: int = 16,
        max_new_tokens: int | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """``Q^μ`` of each prefix by ``n_rollouts`` direct completions from the prover's own model."""
        heads = ["".join(steps) for steps in prefixes]
        out = self.rollout_sampler(task).complete(
            [problem.prompt + head for head in heads], n=n_rollouts, max_new_tokens=max_new_tokens, seed=seed
        )
        correct = [[task.score(problem, head + c) >= 0.5 for c in cs] for head, cs in zip(heads, out.texts)]
        return torch.tensor(correct, dtype=torch.float32).mean(dim=-1)

    def __repr__(self) -> str:
        # A model source is named by its folder where it has one (a plain object repr would print an address).
        policy = getattr(self.policy, "path", None) or self.policy
        return f"CheckpointProver(verifier_path={self.verifier_path!r}, policy={policy!r})"
