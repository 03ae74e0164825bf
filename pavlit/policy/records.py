"""What every sampler takes and returns: its :class:`SamplingSettings`, one call's :class:`Request`, the records.

:class:`SamplerCalls` is the public front both engines share (:class:`~pavlit.policy.sampler.Sampler`, pavlit's
own decoding loop, and :class:`~pavlit.policy.vllm_sampler.VLLMSampler`): ``complete`` and ``next_step`` turn
their arguments into a :class:`Request`, the sampler's defaults filled in, and hand it to the engine's ``_run``.

Text convention (shared with ``pavlit.steps``): a step keeps its delimiter, so ``prefix + texts[i][j]`` is the
continued text, and ``"".join(steps) == response``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

STOP_EOS = "eos"
STOP_DELIMITER = "delimiter"
STOP_MAX_STEPS = "max_steps"
STOP_LENGTH = "length"


@dataclass
class SamplerOutput:
    """What one sampling call produced; outer lists follow the prompts, inner lists their ``n`` samples.

    Attributes:
        texts: The generated text of each sample, without special tokens. For ``next_step`` it ends with the
            delimiter unless the sample stopped at EOS or ``max_new_tokens``.
        finished: Whether the sample ended with EOS (the response is complete; no step can follow).
        stop_reasons: Why each sample stopped: ``"eos"``, ``"delimiter"`` (next_step), ``"max_steps"``
            (complete with ``max_steps``) or ``"length"`` (``max_new_tokens`` reached).
        token_ids: The generated token ids of each sample, the EOS token included when one was generated.
            Text past a step delimiter inside the last token (possible with multi-character tokens) is cut from
            ``texts`` but its token stays here.
        logprobs: With ``return_logprobs=True``, the model's log-probability of each generated token (raw logits,
            temperature 1, no top-p; what RL needs as the behaviour policy's log-probs), aligned with
            ``token_ids``; otherwise ``None``.
        generated_tokens: New tokens actually generated, over all samples (``sum(len(ids))``); padding after a
            sample stopped is not counted.
        prompt_tokens: Prompt tokens prefilled; a prefix shared by ``n`` samples counts once.
    """

    texts: list[list[str]]
    finished: list[list[bool]]
    stop_reasons: list[list[str]]
    token_ids: list[list[list[int]]] = field(repr=False)
    generated_tokens: int = 0
    prompt_tokens: int = 0
    logprobs: list[list[list[float]]] | None = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        """Total samples over all prompts."""
        return sum(len(texts) for texts in self.texts)


@dataclass(frozen=True)
class SamplingSettings:
    """What a job asks of every sampler it builds (the backend adds how); each field is a sampler default."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_batch: int = 256
    delimiter: str = "\n"
    seed: int = 0


#: The request fields a sampler fills from its own defaults when a call leaves them ``None``.
_DEFAULTED = ("max_new_tokens", "temperature", "top_p", "delimiter")


@dataclass(frozen=True)
class Request:
    """One sampling call: how many samples, when each stops, and how tokens are drawn.

    Attributes:
        step_reason: The stop reason of a sample that reached ``max_steps`` delimiters: ``"max_steps"``
            (``complete``) or ``"delimiter"`` (``next_step``).
        n: Samples per prompt.
        max_steps: Stop a sample right after this many delimiters (``None``: only EOS and the token cap stop it).
        max_new_tokens: Cap on new tokens per sample.
        temperature: Softmax temperature (0 = greedy).
        top_p: Nucleus mass (1 = off).
        delimiter: The step delimiter.
        seed: Reseed the sampler first (``None``: continue its random stream).
        return_logprobs: Also return each generated token's log-probability.
    """

    step_reason: str
    n: int = 1
    max_steps: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    delimiter: str | None = None
    seed: int | None = None
    return_logprobs: bool = False

    def resolved(self, defaults: object) -> Request:
        """This request with each of ``max_new_tokens``, ``temperature``, ``top_p``, ``delimiter`` left ``None``
        taken from the attribute of the same name on ``defaults`` (the sampler)."""
        unset = {name: getattr(defaults, name) for name in _DEFAULTED if getattr(self, name) is None}
        return replace(self, **unset)


class SamplerCalls:
    """``complete`` and ``next_step``, shared by every sampler engine; an engine implements ``_run``.

    Attributes:
        temperature: Default softmax temperature (0 = greedy).
        top_p: Default nucleus mass (1 = off).
        max_new_tokens: Default cap on new tokens per sample.
        delimiter: Default step delimiter (docs/method.md §1: a step is a line).
    """

    temperature: float
    top_p: float
    max_new_tokens: int
    delimiter: str

    def _set_defaults(self, temperature: float, top_p: float, max_new_tokens: int, delimiter: str) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.delimiter = delimiter

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
        """``n`` full responses per prompt, each to EOS, ``max_new_tokens`` or ``max_steps`` delimiters.

        Args:
            prompts: Texts to continue (a question, or a question followed by steps).
            n: Samples per prompt.
            max_new_tokens: Cap on new tokens per sample (default: the sampler's).
            max_steps: Stop a sample right after its ``max_steps``-th delimiter (``None``: no step limit).
            temperature: Override the sampler's temperature for this call.
            top_p: Override the sampler's top-p for this call.
            delimiter: Step delimiter counted by ``max_steps`` (default: the sampler's).
            seed: Reseed the generator first, making this call reproducible on its own.
            return_logprobs: Also return each generated token's log-probability under the model.

        Returns:
            A :class:`SamplerOutput`.
        """
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
        request = Request(
            STOP_MAX_STEPS, n, max_steps, max_new_tokens, temperature, top_p, delimiter, seed, return_logprobs
        )
        return self._run(prompts, request.resolved(self))

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
        """``n`` samples of exactly one next step per prefix: text up to and including the first delimiter.

        A sample ends at its first delimiter, at EOS (``finished``; the response is over) or at
        ``max_new_tokens`` (stop reason ``"length"``).

        Args:
            prefixes: Question + steps so far, as one text each.
            n: Samples per prefix.
            delimiter: Step delimiter (default: the sampler's).
            max_new_tokens: Cap on the step's tokens (default: the sampler's).
            temperature: Override the sampler's temperature for this call.
            top_p: Override the sampler's top-p for this call.
            seed: Reseed the generator first.
            return_logprobs: Also return each generated token's log-probability under the model.

        Returns:
            A :class:`SamplerOutput`.
        """
        request = Request(STOP_DELIMITER, n, 1, max_new_tokens, temperature, top_p, delimiter, seed, return_logprobs)
        return self._run(prefixes, request.resolved(self))

    def _run(self, prompts: Sequence[str], request: Request) -> SamplerOutput:
        raise NotImplementedError


def cut_after(text: str, delimiter: str, occurrences: int) -> str:
    """``text`` up to and including its ``occurrences``-th ``delimiter`` (all of it when there are fewer)."""
    end = -len(delimiter)
    for _ in range(occurrences):
        end = text.find(delimiter, end + len(delimiter))
        if end < 0:
            return text
    return text[: end + len(delimiter)]
