"""Final-answer extraction and comparison shared by every text task (the ``Rex`` of docs/method.md §1).

Three questions, three functions:

* :func:`extract_answer` — where does a response state its final answer? GSM8K's ``#### n`` line, MATH's
  ``\\boxed{...}`` (nested braces allowed), an ``Answer: n`` / ``The answer is n`` line, or reasoning-gym's
  ``<answer>...</answer>`` tag. With ``style="auto"`` the marker that occurs **last** wins, because a
  response that revises itself ("The answer is 5. ... so the final answer is 6") means its last word.
* :func:`normalize_answer` — one canonical spelling per value, so that majority voting groups
  ``"$1,234.00"``, ``"1234"`` and ``"\\boxed{1234}"`` together. Numbers become an integer (``"1234"``), a
  terminating decimal without trailing zeros (``"2.5"``, ``"0.75"``) or a reduced fraction (``"1/3"``);
  anything else gets LaTeX/whitespace clean-up only. Idempotent by construction (clean-up runs to a fixpoint).
* :func:`answers_match` — exact rational comparison (:class:`fractions.Fraction`, so ``0.1 + 0.2`` style
  float noise cannot arise) when both sides are numbers, else equality of the normalised strings.

All three are total: they never raise on arbitrary text.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Literal

__all__ = [
    "AnswerStyle",
    "answers_match",
    "extract_answer",
    "has_final_answer",
    "normalize_answer",
    "parse_number",
    "split_solution",
]

AnswerStyle = Literal["auto", "gsm8k", "math", "answer", "tag", "last_number"]

_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
# "Answer: 5", "The answer is 5", "Final answer: 5", "**Answer:** 5"; ``\s*`` after the marker lets the value sit
# on the next line ("Answer:\n5").
_ANSWER_LINE = re.compile(r"\banswer(?:\*\*)?[ \t]*(?:is\b[ \t]*:?|:)(?:\*\*)?\s*([^\n]*)", re.IGNORECASE)
_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_LAST_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[+-]?\.\d+")
# An "Answer:" line often goes on as prose: "The answer is $5$. I hope it is correct." A period followed by
# whitespace ends the answer; a decimal point ("2.5") is never followed by whitespace.
_SENTENCE_END = re.compile(r"\.(?:\s|$)")


def _brace_group(text: str, start: int) -> tuple[str, int] | None:
    """The content of the ``{...}`` group opening at ``text[start]`` and the index after it; None if unbalanced."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def _boxed_candidates(text: str) -> list[tuple[int, str]]:
    found = []
    for match in _BOXED.finditer(text):
        rest = match.end()
        while rest < len(text) and text[rest] in " \t":
            rest += 1
        group = _brace_group(text, rest)
        if group is not None:
            found.append((match.start(), group[0]))
        elif rest > match.end():
            # MATH occasionally writes "\boxed 5": the argument is the next token.
            token = re.match(r"[^\s$]+", text[rest:])
            if token:
                found.append((match.start(), token.group(0)))
    return found


def _line_candidates(text: str) -> list[tuple[int, str]]:
    found = []
    for match in _ANSWER_LINE.finditer(text):
        value = _SENTENCE_END.split(match.group(1), maxsplit=1)[0]
        found.append((match.start(), value))
    return found


def _candidates(text: str, style: str) -> list[tuple[int, str]]:
    if style == "gsm8k":
        return [(m.start(), m.group(1)) for m in _GSM8K.finditer(text)]
    if style == "math":
        return _boxed_candidates(text)
    if style == "answer":
        return _line_candidates(text)
    if style == "tag":
        return [(m.start(), m.group(1)) for m in _TAG.finditer(text)]
    if style == "last_number":
        return [(m.start(), m.group(0)) for m in _LAST_NUMBER.finditer(text)]
    if style == "auto":
        return (
            _candidates(text, "gsm8k")
            + _candidates(text, "math")
            + _candidates(text, "answer")
            + _candidates(text, "tag")
        )
    raise ValueError(f"unknown answer style {style!r}; expected one of auto, gsm8k, math, answer, tag, last_number")


def extract_answer(text: str, style: AnswerStyle = "auto") -> str | None:
    """The final answer a response states, as written (stripped), or ``None`` when it states none.

    Args:
        text: The response (or any text).
        style: ``"gsm8k"`` (the last ``#### x`` line), ``"math"`` (the last ``\\boxed{x}``, nested braces
            allowed), ``"answer"`` (the last ``Answer: x`` / ``The answer is x``, cut at the end of its sentence),
            ``"tag"`` (the last ``<answer>x</answer>``), ``"last_number"`` (the last number anywhere: lenient, for
            sources without a marker), or ``"auto"`` (whichever of the first four markers occurs last).

    Returns:
        The raw answer text (pass it through :func:`normalize_answer` to compare or vote), or ``None`` when no
        marker is present or the marked answer is empty.

    Raises:
        ValueError: If ``style`` is not one of the names above.
    """
    candidates = _candidates(text, style)
    # Latest marker wins; on a tie (``Answer: \boxed{5}`` starts later than ``Answer:``) the inner one is later.
    for _, value in sorted(candidates, key=lambda item: item[0], reverse=True):
        value = value.strip().strip("*").strip()
        if value:
            return value
    return None


def has_final_answer(step: str, style: AnswerStyle = "auto") -> bool:
    """Whether ``step`` states a final answer in ``style`` (used for ``Task.is_final_step``)."""
    return extract_answer(step, style) is not None


# ---------------------------------------------------------------------------------------------------------------
# Normalisation

_WRAPPERS = ("boxed", "fbox", "text", "textbf", "textrm", "mathrm", "mathbf", "mbox")
_WRAPPER = re.compile(r"\\(" + "|".join(_WRAPPERS) + r")\s*(?=\{)")
_DROPPED = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "^{\\circ}", "^\\circ", "\\$", "$", "\\displaystyle")
_INT_FRAC = re.compile(r"\\frac\s*\{\s*([+-]?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_SHORT_FRAC = re.compile(r"\\frac\s*(\d)\s*(\d)")
_LEADING_VARIABLE = re.compile(r"^[A-Za-z]\s*=\s*(?=[^=]*$)")
_SPACE_NEAR_SYMBOL = re.compile(r"\s*([^\w\s])\s*")

_NUMBER = re.compile(
    r"^(?P<number>[+-]?\d+/\d+|[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+)"
    # A trailing percent sign or unit words ("12 apples", "5 km/h", "3 cm^2"). Units need two or more letters so
    # that algebra ("2x") is never read as the number 2.
    r"(?P<unit>%|(?:\s*[A-Za-z][A-Za-z./]+(?:\^\d+)?)*)$"
)
_NOT_UNITS = {"pi", "sqrt", "i"}


def _unwrap(text: str) -> str:
    r"""Replace every ``\text{X}``/``\boxed{X}``/... whose braces balance by ``X``."""
    out = []
    pos = 0
    for match in _WRAPPER.finditer(text):
        if match.start() < pos:
            continue
        group = _brace_group(text, match.end())
        if group is None:
            continue
        out.append(text[pos : match.start()])
        out.append(group[0])
        pos = group[1]
    out.append(text[pos:])
    return "".join(out)


def _cleanup_once(text: str) -> str:
    text = text.strip().replace("\u2212", "-")
    text = _unwrap(text)
    for token in _DROPPED:
        text = text.replace(token, "")
    text = text.replace("\\%", "%").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _INT_FRAC.sub(r"\1/\2", text)
    text = _SHORT_FRAC.sub(r"\1/\2", text)
    text = _LEADING_VARIABLE.sub("", text)
    text = " ".join(text.split())
    text = _SPACE_NEAR_SYMBOL.sub(r"\1", text)
    return text.rstrip(".").strip()


def _cleanup(text: str) -> str:
    # Every rewrite above shortens the text or leaves it unchanged, so this loop ends; the bound is a safety net.
    for _ in range(len(text) + 2):
        cleaned = _cleanup_once(text)
        if cleaned == text:
            break
        text = cleaned
    return text


def _parse_clean(text: str) -> Fraction | None:
    match = _NUMBER.match(text)
    if match is None:
        return None
    words = re.findall(r"[A-Za-z]+", match.group("unit"))
    if any(word.lower() in _NOT_UNITS for word in words):
        return None
    try:
        return Fraction(match.group("number").replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(text: str) -> Fraction | None:
    """The exact value of an answer that is a number, or ``None``.

    Accepts what :func:`normalize_answer` cleans up (``$``, ``\\boxed``, ``\\text``, ``\\frac``/``\\dfrac``)
    followed by an optional sign, thousands commas, a decimal part or ``p/q``, and a trailing ``%`` or unit words.
    A percentage keeps its number: ``"30%"`` is 30 (GSM8K asks "what percent" and expects 30).
    """
    return _parse_clean(_cleanup(text))


def _format_number(value: Fraction) -> str:
    numerator, denominator = value.numerator, value.denominator
    if denominator == 1:
        return str(numerator)
    twos = fives = 0
    rest = denominator
    while rest % 2 == 0:
        rest //= 2
        twos += 1
    while rest % 5 == 0:
        rest //= 5
        fives += 1
    if rest != 1:
        return f"{numerator}/{denominator}"
    digits = max(twos, fives)
    scaled = abs(numerator) * 10**digits // denominator
    sign = "-" if numerator < 0 else ""
    whole, frac = divmod(scaled, 10**digits)
    return f"{sign}{whole}.{str(frac).rjust(digits, '0').rstrip('0')}"


def normalize_answer(text: str) -> str:
    """A canonical spelling of an answer: equal values get equal strings; idempotent.

    Numbers (see :func:`parse_number`) become ``"1234"``, ``"-2.5"`` or ``"1/3"`` (a reduced fraction when the
    decimal would not terminate). Other answers lose LaTeX decoration (``$``, ``\\boxed{}``, ``\\text{}``,
    ``\\left``/``\\right``, thin spaces, a trailing period), have ``\\dfrac``/``\\tfrac`` spelled ``\\frac``,
    and keep no whitespace around symbols.
    """
    cleaned = _cleanup(text)
    value = _parse_clean(cleaned)
    return cleaned if value is None else _format_number(value)


def answers_match(prediction: str | None, reference: str | None) -> bool:
    """Whether a predicted answer equals a reference answer.

    Numbers compare as exact fractions (``"2.50"`` == ``"5/2"`` == ``"\\frac{5}{2}"``); anything else compares
    as normalised strings. ``None`` or an empty answer never matches.
    """
    if prediction is None or reference is None:
        return False
    predicted, expected = normalize_answer(prediction), normalize_answer(reference)
    if not predicted or not expected:
        return False
    left, right = _parse_clean(predicted), _parse_clean(expected)
    if left is not None and right is not None:
        return left == right
    return predicted == expected


def split_solution(text: str, delimiter: str = "\n") -> tuple[str, ...]:
    """Split a reference solution into steps that keep their delimiter, dropping blank lines.

    Blank lines are dropped (not merged) so that reference steps look like what a step-aware sampler produces
    from a policy trained on them: a step is one non-empty line. Every step ends with ``delimiter``, the last one
    included, so ``"".join(steps)`` is the solution without blank lines and with one final delimiter.

    Args:
        text: The solution text.
        delimiter: The step delimiter (the task's ``step_delimiter``).

    Returns:
        The steps; empty when ``text`` has no non-blank line.
    """
    return tuple(line + delimiter for line in text.split(delimiter) if line.strip())
