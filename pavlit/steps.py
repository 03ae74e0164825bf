"""Step segmentation and the map from steps to token positions.

This is the one module that decides what a step is and which token carries its score. Labelling,
training, search and RL all call it, so a step boundary means the same thing in every stage.

Conventions:

* **Steps keep their delimiter.** A response is cut right *after* every occurrence of the delimiter, so
  ``join_steps(split_steps(r, d)) == r`` for every ``r`` and ``d``. The last step may lack the delimiter.
* **No blank steps.** A *blank* piece, one that is whitespace apart from its delimiter (an empty line ``"\\n"``,
  ``"  \\n"``, a repeated delimiter), is not a step of its own: it is appended to the step before it; blank pieces
  at the very start of a response are prepended to the first step instead. A response made of blank pieces only
  is one step (and the empty response has no steps).
* **A step's score lives on the last token that overlaps it.** Tokens are assigned to text segments (the
  prompt, step 1, step 2, ...) by the character *their span starts in*. The end token of step ``h`` is the last
  token assigned to the prompt or to steps ``1..h``. A token that merges a step's delimiter with the start of
  the next step (``".\\nThe"``) therefore counts for the step it starts in, and is the end token of that step.
  Special tokens the tokenizer inserts (empty character span) before the text belong to the prompt; those
  after the text belong to no step.
* **Prefix stability.** Tokenising ``prompt + steps[:h]`` on its own gives ``input_ids[: step_ends[h-1] + 1]``
  (less trailing special tokens) only when no token crosses the end of step ``h`` and the tokenizer splits its
  input there before tokenising (character-level, a pre-tokenizer that splits after the delimiter, or one that
  splits on whitespace such as BERT's). Byte-level BPE over whole texts can merge ``".\\n"`` or ``"\\n\\n"``
  with the next step; that is why every stage tokenises the full text once and reads positions from here,
  rather than tokenising prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "StepBatch",
    "StepTokens",
    "gather_positions",
    "join_steps",
    "outcome_tokens",
    "pad_id_of",
    "pad_step_batch",
    "split_steps",
    "step_end_token_indices",
]


def split_steps(response: str, delimiter: str = "\n") -> list[str]:
    """Split ``response`` into steps that keep their delimiter (see the module docstring for the exact rule).

    Args:
        response: The text to split.
        delimiter: The non-empty text that ends a step.

    Returns:
        The steps; ``"".join`` of them is ``response``. No step is empty, and no step is blank (whitespace apart
        from delimiters) unless the whole response is.

    Raises:
        ValueError: If ``delimiter`` is empty.

    Example:
        >>> split_steps("a\\n\\nb\\nc", "\\n")
        ['a\\n\\n', 'b\\n', 'c']
    """
    if not delimiter:
        raise ValueError("the step delimiter must be a non-empty string")
    pieces: list[str] = []
    start = 0
    while True:
        found = response.find(delimiter, start)
        if found < 0:
            break
        end = found + len(delimiter)
        pieces.append(response[start:end])
        start = end
    if start < len(response):
        pieces.append(response[start:])

    steps: list[str] = []
    leading_blank = ""
    for piece in pieces:
        content = piece[: -len(delimiter)] if piece.endswith(delimiter) else piece
        if content.strip():
            steps.append(leading_blank + piece)
            leading_blank = ""
        elif steps:
            steps[-1] += piece
        else:
            leading_blank += piece
    if leading_blank:
        # Only reached when every piece is blank.
        steps.append(leading_blank)
    return steps


def join_steps(steps: Sequence[str]) -> str:
    """The response made of ``steps`` (the inverse of :func:`split_steps`)."""
    return "".join(steps)


@dataclass(frozen=True)
class StepTokens:
    """One tokenised ``prompt + steps`` sequence and where each prefix ends.

    Attributes:
        input_ids: Token ids of ``prompt + "".join(steps)``, with the tokenizer's special tokens if requested.
        prompt_end: Index of the last token of the question-only prefix (h = 0): the last token assigned to the
            prompt, a leading special token such as BOS when the prompt is empty, or -1 when there is none
            (an empty prompt with no BOS cannot be scored).
        step_ends: ``step_ends[h-1]`` is the index of the end token of step ``h``; non-decreasing.
    """

    input_ids: list[int]
    prompt_end: int
    step_ends: list[int]

    @property
    def prefix_ends(self) -> list[int]:
        """``[prompt_end, *step_ends]``: the score position of every prefix h = 0..H."""
        return [self.prompt_end, *self.step_ends]


def _segment_bounds(prompt: str, steps: Sequence[str]) -> list[int]:
    """Character offsets where the prompt and each step end."""
    bounds = [len(prompt)]
    for step in steps:
        bounds.append(bounds[-1] + len(step))
    return bounds


def step_end_token_indices(
    prompt: str, steps: Sequence[str], tokenizer: Any, *, add_special_tokens: bool = True
) -> StepTokens:
    """Tokenise ``prompt + steps`` once and find the end token of the prompt and of every step.

    Fast tokenizers (``tokenizer.is_fast``) are read through their character offsets. Other tokenizers fall
    back to incremental tokenisation: ``prompt + steps[:h]`` is tokenised for every ``h`` and compared with
    the full sequence; the step ends at the last token shared with the full sequence, or at the first token that
    differs (the one that crosses the step boundary). Both give the same answer when no token crosses a boundary.

    Args:
        prompt: The question text (may be empty).
        steps: The response steps, as :func:`split_steps` returns them.
        tokenizer: A Hugging Face tokenizer (anything callable like one).
        add_special_tokens: Passed to the tokenizer.

    Returns:
        The ids and the end indices.

    Raises:
        ValueError: If a step maps to no token at all (e.g. an empty prompt, no BOS, and a first step the
            tokenizer drops entirely).
    """
    bounds = _segment_bounds(prompt, steps)
    if getattr(tokenizer, "is_fast", False):
        ids, ends = _ends_from_offsets(prompt + join_steps(steps), bounds, tokenizer, add_special_tokens)
    else:
        ids, ends = _ends_from_prefixes(prompt + join_steps(steps), bounds, tokenizer, add_special_tokens)
    for h, end in enumerate(ends[1:], start=1):
        if end < 0:
            raise ValueError(f"step {h} ({steps[h - 1]!r}) maps to no token; give the tokenizer a BOS token")
    return StepTokens(input_ids=ids, prompt_end=ends[0], step_ends=ends[1:])


def _ends_from_offsets(text: str, bounds: list[int], tokenizer: Any, add_special_tokens: bool) -> tuple[list, list]:
    encoding = tokenizer(
        text,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    special = encoding["special_tokens_mask"]
    # Inserted special tokens have an empty span; special tokens written in the text (chat markers) do not, and
    # are ordinary text tokens here.
    inserted = [bool(s) and start == end for s, (start, end) in zip(special, offsets)]
    first_text = next((j for j, ins in enumerate(inserted) if not ins), len(ids))

    ends = []
    j = -1
    last_leading = first_text - 1  # index of the last leading inserted token, or -1
    cursor = first_text
    for bound in bounds:
        # Advance over text tokens that start before this boundary; inserted tokens after the text are skipped.
        while cursor < len(ids) and (inserted[cursor] or offsets[cursor][0] < bound):
            if not inserted[cursor]:
                j = cursor
            cursor += 1
        ends.append(j if j >= 0 else last_leading)
    return ids, ends


def _split_specials(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], int]:
    """The ids with special tokens, and how many special tokens precede the text's own ids."""
    with_specials = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for n_lead in range(len(with_specials) - len(plain) + 1):
        if with_specials[n_lead : n_lead + len(plain)] == plain:
            return with_specials, n_lead
    raise ValueError("the tokenizer's special tokens do not wrap the text's own ids; cannot locate step ends")


def _ends_from_prefixes(text: str, bounds: list[int], tokenizer: Any, add_special_tokens: bool) -> tuple[list, list]:
    ids, n_lead = _split_specials(tokenizer, text, add_special_tokens)
    full = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ends = []
    previous = -1
    for bound in bounds:
        prefix = list(tokenizer(text[:bound], add_special_tokens=False)["input_ids"]) if bound else []
        shared = 0
        while shared < min(len(prefix), len(full)) and prefix[shared] == full[shared]:
            shared += 1
        # All of the prefix's tokens are shared: the step ends on its last one. Otherwise the first differing
        # token of the full sequence starts inside the prefix and crosses the boundary: the step ends there.
        end = shared - 1 if shared == len(prefix) else min(shared, len(full) - 1)
        end = max(end + n_lead if end >= 0 else n_lead - 1, previous)
        ends.append(end)
        previous = end
    return ids, ends


@dataclass(frozen=True)
class StepBatch:
    """A padded batch of :class:`StepTokens`.

    Attributes:
        input_ids: ``[B, T]`` token ids, padded with the pad id.
        attention_mask: ``[B, T]`` 1 on real tokens, 0 on padding.
        prompt_end: ``[B]`` position of the question-only prefix's end token in the padded row (0 where the
            sequence has none; see ``prefix_mask``).
        step_ends: ``[B, H]`` position of each step's end token in the padded row, ``H`` the largest number of
            steps in the batch; 0 at padded steps.
        step_mask: ``[B, H]`` True on real steps.
        prompt_mask: ``[B]`` True where the question-only prefix has a token (``prompt_end >= 0`` before padding).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_end: torch.Tensor
    step_ends: torch.Tensor
    step_mask: torch.Tensor
    prompt_mask: torch.Tensor

    @property
    def prefix_positions(self) -> torch.Tensor:
        """``[B, H+1]`` score positions of prefixes h = 0..H (column 0 is the question-only prefix)."""
        return torch.cat([self.prompt_end[:, None], self.step_ends], dim=1)

    @property
    def prefix_mask(self) -> torch.Tensor:
        """``[B, H+1]`` True where ``prefix_positions`` is a real prefix with a token."""
        return torch.cat([self.prompt_mask[:, None], self.step_mask], dim=1)


def pad_step_batch(items: Sequence[StepTokens], pad_id: int, side: Literal["right", "left"] = "right") -> StepBatch:
    """Pad tokenised sequences into one batch and move their step positions with the padding.

    Args:
        items: Tokenised sequences from :func:`step_end_token_indices`.
        pad_id: Id written at padded positions.
        side: ``"right"`` appends padding (training); ``"left"`` prepends it (generation), which shifts every
            position of a row by its amount of padding.

    Returns:
        The padded batch.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not items:
        raise ValueError("cannot pad an empty batch")
    n_rows = len(items)
    width = max(len(item.input_ids) for item in items)
    n_steps = max(len(item.step_ends) for item in items)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
    prompt_end = torch.zeros(n_rows, dtype=torch.long)
    prompt_mask = torch.zeros(n_rows, dtype=torch.bool)
    step_ends = torch.zeros((n_rows, n_steps), dtype=torch.long)
    step_mask = torch.zeros((n_rows, n_steps), dtype=torch.bool)
    for row, item in enumerate(items):
        length = len(item.input_ids)
        shift = width - length if side == "left" else 0
        input_ids[row, shift : shift + length] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, shift : shift + length] = 1
        if item.prompt_end >= 0:
            prompt_end[row] = item.prompt_end + shift
            prompt_mask[row] = True
        n = len(item.step_ends)
        step_ends[row, :n] = torch.tensor(item.step_ends, dtype=torch.long) + shift
        step_mask[row, :n] = True
    return StepBatch(input_ids, attention_mask, prompt_end, step_ends, step_mask, prompt_mask)


def gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Read per-token ``values`` at ``positions``.

    Args:
        values: ``[B, T]`` (one score per token) or ``[B, T, D]`` (hidden states).
        positions: ``[B, K]`` token positions, e.g. :attr:`StepBatch.prefix_positions`.

    Returns:
        ``[B, K]`` or ``[B, K, D]``.
    """
    if values.dim() == 2:
        return values.gather(1, positions)
    index = positions[..., None].expand(*positions.shape, values.shape[-1])
    return values.gather(1, index)


def outcome_tokens(prompt: str, response: str, tokenizer: Any) -> StepTokens:
    """Tokenise ``prompt + response`` with the response as one segment, so its end token is the score position."""
    return step_end_token_indices(prompt, [response] if response else [], tokenizer)


def pad_id_of(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its eos (padding is masked out either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"the tokenizer {name!r} has neither a pad nor an eos token, so batches cannot be padded; set "
            "tokenizer.pad_token (e.g. to an existing special token) first"
        )
    return int(pad)
