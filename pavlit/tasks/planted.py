"""The didactic planted-subsequence task of docs/method.md §7 (paper §3.3).

A response is a sequence of ``length`` tokens over ``{0, ..., vocab_size − 1}``; token ``eos`` ends it early
(everything after it is masked). The reward is 1 iff the hidden ``target`` appears contiguously before the end.

Two views of the same task:

* **Tokens** (for tiny token-level policies): ``LongTensor[B, L]`` sequences, :meth:`PlantedTask.reward`.
* **Text** (the :class:`~pavlit.interfaces.Task` API, so it is a ``pavlit.tasks`` plugin): the prompt is empty and
  a response writes each token as its decimal number followed by a space, one token per step:
  ``"3 6 0 3 5 14"``. The step delimiter is ``" "``; :func:`pavlit.steps.split_steps` yields ``"3 "``, ``"6 "``, ...

Exact values. Whether a prefix can still succeed depends on it only through the *match state* ``k``: the
length of the longest prefix of ``target`` that is a suffix of the tokens so far (the Knuth–Morris–Pratt
automaton), plus whether the target was already found or EOS was written. For a policy whose next-token
distribution depends only on ``k`` (the γ-prover, the uniform policy), :meth:`PlantedTask.automaton_values`
computes ``Q`` exactly by dynamic programming over (position, k); for any other policy
:meth:`PlantedTask.exact_q` enumerates the tree of continuations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pavlit.interfaces import SPLITS, Problem, Task

__all__ = ["PlantedTask"]

TokenPrefix = Sequence[int] | Sequence[str] | str | torch.Tensor


class PlantedTask(Task):
    """Find a planted target subsequence (docs/method.md §7).

    Args:
        target: The hidden subsequence ``y*``; tokens in ``[0, vocab_size)``, without ``eos``.
        length: Number of tokens in a full sequence.
        vocab_size: Number of tokens, EOS included.
        eos: The end-of-sequence token.
        n_problems: How many (identical) problems each split lists; the task is really one problem, several
            copies with distinct ids let per-problem stages (labelling, search) draw several seeds.
    """

    step_delimiter = " "

    def __init__(
        self,
        target: Sequence[int] = (3, 6, 0, 3, 5),
        length: int = 10,
        vocab_size: int = 15,
        eos: int = 14,
        n_problems: int = 1,
    ) -> None:
        self.target = tuple(int(t) for t in target)
        self.length = int(length)
        self.vocab_size = int(vocab_size)
        self.eos = int(eos)
        self.n_problems = int(n_problems)
        if not self.target:
            raise ValueError("target must not be empty")
        if not 0 <= self.eos < self.vocab_size:
            raise ValueError(f"eos must be a token in [0, {self.vocab_size}), got {self.eos}")
        if any(not 0 <= t < self.vocab_size or t == self.eos for t in self.target):
            raise ValueError(f"target tokens must lie in [0, {self.vocab_size}) and differ from eos {self.eos}")
        if self.length < len(self.target):
            raise ValueError(f"length {self.length} is shorter than the target ({len(self.target)} tokens)")
        if self.n_problems < 1:
            raise ValueError("n_problems must be at least 1")
        self._transitions = self._kmp_transitions()

    # ---- text view (the Task API) ------------------------------------------------------------------------------

    def problems(self, split: str) -> list[Problem]:
        """``n_problems`` copies of the one problem: an empty prompt whose answer is the target."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        answer = self.format_tokens(self.target)
        return [
            Problem(id=f"planted-{split}-{i}", prompt="", answer=answer, metadata={"target": list(self.target)})
            for i in range(self.n_problems)
        ]

    def score(self, problem: Problem, response: str) -> float:
        """1.0 iff the target appears in the response's first ``length`` tokens, before any EOS.

        A response with a word that is not a token of the vocabulary scores 0; tokens past ``length`` are
        ignored (a sampler stops there).
        """
        try:
            tokens = self.parse(response)
        except ValueError:
            return 0.0
        return float(self.reward(torch.tensor([tokens[: self.length]], dtype=torch.long)).item())

    def is_final_step(self, step: str) -> bool:
        """Whether ``step`` is the EOS token."""
        return step.strip() == str(self.eos)

    def format_tokens(self, tokens: Sequence[int] | torch.Tensor) -> str:
        """Tokens as text: ``"3 6 0"`` (the inverse of :meth:`parse`)."""
        return " ".join(str(int(t)) for t in tokens)

    def tokens_to_steps(self, tokens: Sequence[int] | torch.Tensor) -> list[str]:
        """One step per token, each but the last followed by the delimiter, as :func:`pavlit.steps.split_steps`
        cuts :meth:`format_tokens`."""
        words = [str(int(t)) for t in tokens]
        return [w + self.step_delimiter for w in words[:-1]] + words[-1:]

    def parse(self, text: str) -> list[int]:
        """Tokens of a response or of a step; raises ``ValueError`` on words outside the vocabulary."""
        tokens = []
        for word in text.split():
            if not word.isdigit() or not 0 <= int(word) < self.vocab_size:
                raise ValueError(f"{word!r} is not a token of the planted task (0..{self.vocab_size - 1})")
            tokens.append(int(word))
        return tokens

    def to_tokens(self, prefix: TokenPrefix) -> list[int]:
        """Tokens of a prefix given as token ids, a tensor, step strings (``["3 ", "6 "]``) or one string."""
        if isinstance(prefix, str):
            return self.parse(prefix)
        if isinstance(prefix, torch.Tensor):
            prefix = prefix.tolist()
        tokens: list[int] = []
        for item in prefix:
            if isinstance(item, str):
                tokens.extend(self.parse(item))
            else:
                if not 0 <= int(item) < self.vocab_size:
                    raise ValueError(f"token {item} is outside the vocabulary [0, {self.vocab_size})")
                tokens.append(int(item))
        return tokens

    # ---- token view --------------------------------------------------------------------------------------------

    def reward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Outcome reward of token sequences.

        Args:
            tokens: ``LongTensor[B, L]``; positions at and after the first EOS are masked.

        Returns:
            ``[B]`` float tensor, 1.0 where the target appears contiguously before the first EOS.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be shaped [B, L], got {tuple(tokens.shape)}")
        n_rows, n_cols = tokens.shape
        m = len(self.target)
        if n_cols < m:
            return torch.zeros(n_rows, device=tokens.device)
        is_eos = tokens == self.eos
        first_eos = torch.where(is_eos.any(dim=1), is_eos.to(torch.uint8).argmax(dim=1), n_cols)
        target = torch.tensor(self.target, dtype=tokens.dtype, device=tokens.device)
        windows = tokens.unfold(1, m, 1)  # [B, L - m + 1, m]
        matches = (windows == target).all(dim=-1)
        window_end = torch.arange(m - 1, n_cols, device=tokens.device)
        matches &= window_end[None, :] < first_eos[:, None]
        return matches.any(dim=1).to(torch.get_default_dtype())

    @property
    def transitions(self) -> torch.Tensor:
        """``[m, vocab_size]`` KMP automaton: the match state after writing token ``t`` in state ``k < m``.

        State ``m`` (target found) is absorbing and not tabulated.
        """
        return self._transitions.clone()

    def _kmp_transitions(self) -> torch.Tensor:
        m = len(self.target)
        table = torch.zeros(m, self.vocab_size, dtype=torch.long)
        for k in range(m):
            for t in range(self.vocab_size):
                seq = self.target[:k] + (t,)
                # The longest prefix of the target that is a suffix of seq.
                table[k, t] = next(j for j in range(min(len(seq), m), -1, -1) if seq[len(seq) - j :] == self.target[:j])
        return table

    def match_state(self, prefix: TokenPrefix) -> tuple[int, bool]:
        """Where a prefix stands: ``(k, ended)``.

        ``k`` is the automaton state (``len(target)`` once the target was found, which is absorbing); ``ended`` is
        whether the prefix wrote EOS or reached ``length`` tokens. Tokens after an EOS are ignored.
        """
        tokens = self.to_tokens(prefix)
        if len(tokens) > self.length:
            raise ValueError(f"prefix has {len(tokens)} tokens, more than length {self.length}")
        m = len(self.target)
        k = 0
        for t in tokens:
            if t == self.eos:
                return k, True
            if k < m:
                k = int(self._transitions[k, t])
        return k, len(tokens) == self.length

    def match_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Batched automaton states: ``[B, L+1]`` with column ``i`` the state after ``i`` tokens.

        EOS is not special here (callers mask positions after it); state ``len(target)`` is absorbing.
        """
        n_rows, n_cols = tokens.shape
        m = len(self.target)
        extended = torch.cat([self._transitions, torch.full((1, self.vocab_size), m)], dim=0).to(tokens.device)
        states = torch.zeros(n_rows, n_cols + 1, dtype=torch.long, device=tokens.device)
        for i in range(n_cols):
            states[:, i + 1] = extended[states[:, i], tokens[:, i]]
        return states

    def automaton_values(self, probs_by_state: torch.Tensor) -> torch.Tensor:
        """Exact success probabilities of a policy whose next token depends only on the match state.

        Args:
            probs_by_state: ``[m, vocab_size]`` (or ``[m + 1, vocab_size]``; the found row is unused) next-token
                probabilities in each state ``k < m``; rows must sum to 1 within 1e-5 and are renormalised in
                float64.

        Returns:
            ``[length + 1, m + 1]`` float64 table ``V[i, k]``: the probability of success after ``i`` tokens in
            state ``k`` with no EOS written (column ``m``, found, is 1).
        """
        m = len(self.target)
        probs = torch.as_tensor(probs_by_state, dtype=torch.float64)
        if probs.dim() != 2 or probs.shape[0] not in (m, m + 1) or probs.shape[1] != self.vocab_size:
            raise ValueError(f"probs_by_state must be shaped [{m} or {m + 1}, {self.vocab_size}]")
        probs = probs[:m]
        if not bool((probs >= 0).all()) or not torch.allclose(probs.sum(-1), torch.ones_like(probs[:, 0]), atol=1e-5):
            raise ValueError("each row of probs_by_state must be a probability distribution")
        # Renormalise in float64 so that float32 inputs (rows summing to 1 ± 1e-7) give exact-to-float64 values.
        probs = probs / probs.sum(dim=-1, keepdim=True)
        table = torch.zeros(self.length + 1, m + 1, dtype=torch.float64)
        table[:, m] = 1.0
        not_eos = torch.ones(self.vocab_size, dtype=torch.float64)
        not_eos[self.eos] = 0.0  # writing EOS before finding the target fails
        for i in range(self.length - 1, -1, -1):
            next_values = table[i + 1][self._transitions]  # [m, vocab]
            table[i, :m] = (probs * next_values * not_eos).sum(dim=-1)
        return table

    def automaton_q(self, prefix: TokenPrefix, table: torch.Tensor) -> float:
        """``Q`` of one prefix read from an :meth:`automaton_values` table."""
        tokens = self.to_tokens(prefix)
        k, ended = self.match_state(tokens)
        if k == len(self.target):
            return 1.0
        if ended:
            return 0.0
        return float(table[len(tokens), k])

    def exact_q(self, prefix: TokenPrefix, next_token_probs: Callable[[list[int]], Sequence[float]]) -> float:
        """``Q`` of a prefix under an arbitrary policy, by enumerating every continuation.

        Costs up to ``vocab_size ** (length − len(prefix))`` calls; meant for short remaining lengths and for
        checking :meth:`automaton_values`.

        Args:
            prefix: The tokens so far.
            next_token_probs: Maps a token prefix (a list) to the ``vocab_size`` next-token probabilities.
        """
        tokens = self.to_tokens(prefix)
        k, ended = self.match_state(tokens)
        return self._enumerate(tokens, k, ended, next_token_probs, self._transitions.tolist())

    def _enumerate(
        self, tokens: list[int], k: int, ended: bool, next_token_probs: Callable, transitions: list[list[int]]
    ) -> float:
        if k == len(self.target):
            return 1.0
        if ended:
            return 0.0
        probs = [float(p) for p in next_token_probs(tokens)]
        if len(probs) != self.vocab_size:
            raise ValueError(f"next_token_probs must return {self.vocab_size} probabilities, got {len(probs)}")
        total = 0.0
        for t, p in enumerate(probs):
            if p > 0 and t != self.eos:  # writing EOS before the target fails
                ended_next = len(tokens) + 1 == self.length
                total += p * self._enumerate(tokens + [t], transitions[k][t], ended_next, next_token_probs, transitions)
        return total
