"""The contracts a pavlit plugin implements.

One small abstract class per entry-point group:

============== =================== ==========================================================
group          interface           what a plugin provides
============== =================== ==========================================================
pavlit.tasks   :class:`Task`       problems with a verifiable answer and a checker ``Rex``
pavlit.provers :class:`Prover`     the prover policy ``μ`` whose advantages are the process reward
pavlit.rewards :class:`Reward`     a reward composition that scores step prefixes (``orm``, ``pqv``, ``pav``)
pavlit.search  :class:`Search`     a test-time search strategy (best-of-N, beam, ...)
============== =================== ==========================================================

A plugin is a class that subclasses one of these and is named in its package's ``pyproject.toml``::

    [project.entry-points."pavlit.provers"]
    tempered = "my_pkg.provers:TemperedProver"

``pavlit plugins`` then lists it, and a LightningCLI YAML selects it by short class name
(``class_path: TemperedProver``) or by full import path.

Two more contracts are not entry-point groups: :class:`Sampler`, the type of the policy's sampler that rewards,
searches and provers call, and :class:`AdvantageSource`, where online RL gets ``Q^μ`` (:mod:`pavlit.advantages`
holds pavlit's; a YAML names one by short class name once its module is imported).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:  # annotations only: `pavlit --help` and `pavlit plugins` should not pay for importing torch
    import torch

    from pavlit.policy.records import SamplerOutput

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    Args:
        id: Stable identifier, unique within a task and split (used to group labels and split data).
        prompt: The question text given to the policy.
        answer: The reference final answer, as text.
        reference_steps: A reference solution as steps (each ending in the task's delimiter except possibly the
            last), used for SFT; ``None`` when the source has none.
        metadata: Anything else the source carries (difficulty, raw record, ...).
    """

    id: str
    prompt: str
    answer: str
    reference_steps: tuple[str, ...] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A source of problems with a binary checker ``Rex(response) ∈ {0, 1}``.

    Attributes:
        step_delimiter: The text that ends a step (docs/method.md §1: a step is one line).
    """

    step_delimiter: ClassVar[str] = "\n"

    @abstractmethod
    def problems(self, split: str) -> Sequence[Problem]:
        """The problems of ``split`` (one of ``train``, ``validation``, ``test``), deterministic for a task config."""

    @abstractmethod
    def score(self, problem: Problem, response: str) -> float:
        """``Rex``: 1.0 when ``response`` ends with the right final answer for ``problem``, else 0.0."""

    def extract_answer(self, response: str) -> str | None:
        """The final answer stated in ``response``, normalised, or ``None`` when it states none.

        Used for majority voting; the default says nothing can be extracted.
        """
        return None

    def is_final_step(self, step: str) -> bool:
        """Whether ``step`` states the final answer, so a response ending with it is finished."""
        return False


class Prover(ABC):
    """The prover policy ``μ`` that defines process rewards as advantages ``A^μ`` (docs/method.md §2).

    A prover answers one question: given step prefixes and the base policy's values ``Q^π`` on them,
    what are the prover's values ``Q^μ``? Advantages then follow as consecutive differences
    (:func:`pavlit.values.advantages`).
    """

    @abstractmethod
    def q_values(
        self,
        q_pi: torch.Tensor,
        prefixes: Sequence[Sequence[str]] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``Q^μ`` for each prefix.

        Args:
            q_pi: ``Q^π`` of the same prefixes, any shape, values in [0, 1].
            prefixes: The prefixes themselves (steps so far), for provers that need more than ``Q^π``
                (a fixed checkpoint's own Q-model, a planted prover's exact values). Flattened in the
                order of ``q_pi.flatten()``.
            prompts: The question of each prefix, in the same order (for provers that score text).

        Returns:
            A tensor shaped like ``q_pi`` with values in [0, 1].
        """


@dataclass
class RewardScores:
    """What a reward composition says about a batch of prefixes (one entry per prefix).

    Attributes:
        reward: ``[n]`` the score search ranks by: for ``pav`` the effective reward of the prefix's last step,
            ``Q̂^π(prefix) + α·(Q̂^μ(prefix) − Q̂^μ(parent))``; for ``orm`` the outcome score.
        value: ``[n]`` the composition's estimate of ``Q^π(prefix)``, the chance the prefix ends correct; beam
            search picks its final answer by it and best-of-N ranks full responses by it.
        calls: Verifier calls per prefix (items scored; Monte-Carlo rollouts for the ``mc`` oracle), or ``None``
            for one call each.
        tokens: Tokens generated to score each prefix (only compositions that roll out spend any), or ``None``.
    """

    reward: torch.Tensor
    value: torch.Tensor
    calls: list[int] | None = None
    tokens: list[int] | None = None


class Reward(ABC):
    """A reward composition: scores step prefixes for test-time search (docs/method.md §5).

    A prefix is the list of steps so far (each keeping its delimiter, as :func:`pavlit.steps.split_steps`
    returns them); the empty list is the question-only prefix. ``problems[i]`` is the problem of
    ``prefixes[i]``, so one call scores prefixes of many problems at once (one batched verifier pass).
    """

    def bind(self, task: Task, sampler: Sampler) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Called by a search before it scores anything: the task and the policy's sampler in use.

        Load verifiers here (onto ``sampler.device``), not in ``__init__``, so configs stay cheap to parse.
        """

    @abstractmethod
    def score(
        self,
        problems: Sequence[Problem],
        prefixes: Sequence[Sequence[str]],
        finished: Sequence[bool] | None = None,
    ) -> RewardScores:
        """Score each prefix.

        Args:
            problems: The problem of each prefix.
            prefixes: Steps so far, one list per prefix.
            finished: Whether each prefix is a complete response (EOS or a final-answer step); compositions that
                roll out score those exactly instead of continuing them. ``None``: none is.
        """


class Search(ABC):
    """A test-time search strategy: a batch of problems and a compute budget in, one chosen response each out.

    The job hands a strategy the task (checker, answer extraction, step delimiter), the policy's
    :class:`~pavlit.policy.sampler.Sampler` and a :class:`Reward`; strategies batch across problems.
    """

    @abstractmethod
    def run(
        self,
        problems: Sequence[Problem],
        budget: int,
        *,
        task: Task,
        sampler: Sampler,
        reward: Reward | None,
        seed: int = 0,
    ) -> list[dict[str, Any]]:
        """Search every problem at ``budget`` (N for best-of-N, beam width B for beam search).

        Returns:
            One dict per problem with at least ``response`` (the chosen text) and ``tokens`` (tokens generated
            for that problem); pavlit's strategies add ``step_samples``, ``verifier_calls``, ``reward_tokens``
            and ``picks`` (other selections of the same candidates, name → response, e.g. majority vote).
        """

    def run_budgets(
        self,
        problems: Sequence[Problem],
        budgets: Sequence[int],
        *,
        task: Task,
        sampler: Sampler,
        reward: Reward | None,
        seed: int = 0,
    ) -> dict[int, list[dict[str, Any]]]:
        """:meth:`run` at every budget; override to share work (best-of-N draws the largest N once)."""
        return {
            budget: self.run(problems, budget, task=task, sampler=sampler, reward=reward, seed=seed)
            for budget in budgets
        }


INTERFACES: dict[str, type] = {
    "pavlit.tasks": Task,
    "pavlit.provers": Prover,
    "pavlit.rewards": Reward,
    "pavlit.search": Search,
}


class Sampler(Protocol):
    """What rewards, searches and provers call on the policy's sampler (a type for annotations, not a plugin group).

    pavlit's engines are :class:`pavlit.policy.sampler.Sampler` (its own decoding loop) and
    :class:`pavlit.policy.vllm_sampler.VLLMSampler`, chosen by a job's ``backend:``; both get these two calls from
    :class:`pavlit.policy.records.SamplerCalls`, whose docstrings explain every argument. A step keeps its
    delimiter, so ``prefix + texts[i][j]`` is the continued text.

    Attributes:
        tokenizer: The policy's tokenizer (encodes prompts, decodes token ids).
        device: Where the job's other models (verifiers) go.
    """

    tokenizer: Any
    device: torch.device

    def complete(
        self,
        prompts: Sequence[str],
        n: int = 1,
        max_new_tokens: int | None = None,
        max_steps: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        delimiter: str | None = None,
        seed: int | None = None,
        return_logprobs: bool = False,
    ) -> SamplerOutput:
        """``n`` full responses per prompt, each to EOS, ``max_new_tokens`` or ``max_steps`` delimiters."""
        ...

    def next_step(
        self,
        prefixes: Sequence[str],
        n: int = 1,
        delimiter: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        return_logprobs: bool = False,
    ) -> SamplerOutput:
        """``n`` samples of exactly one next step per prefix: text up to and including the first delimiter."""
        ...


class AdvantageSource(ABC):
    """Where ``Q^μ`` (and so ``Â^μ``) of the steps of RL rollouts comes from."""

    @abstractmethod
    def prefix_values(
        self,
        problems: Sequence[Problem],
        steps: Sequence[Sequence[str]],
        *,
        task: Task,
        sampler: Sampler,
        seed: int | None = None,
    ) -> list[torch.Tensor]:
        """``Q^μ`` of every prefix ``h = 0..H`` of each rollout.

        Args:
            problems: The problem of each rollout.
            steps: Each rollout's steps.
            task: Scores completions (Monte-Carlo sources).
            sampler: The current policy's sampler (its ``device`` is where models go).
            seed: Seed for sources that sample.

        Returns:
            One float tensor ``[H_i + 1]`` per rollout, values in [0, 1], column 0 the question-only prefix.
        """
