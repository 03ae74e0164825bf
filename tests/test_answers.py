from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pavlit.tasks.answers import (
    answers_match,
    extract_answer,
    has_final_answer,
    normalize_answer,
    parse_number,
    split_solution,
)


@pytest.mark.parametrize(
    ("text", "style", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "gsm8k", "72"),
        ("#### 1,234\n", "gsm8k", "1,234"),
        ("#### 5\nmore text\n#### 6", "gsm8k", "6"),
        ("no marker here 42", "gsm8k", None),
        ("####   \n", "gsm8k", None),
        ("so $x = \\boxed{\\frac{3}{4}}$.", "math", "\\frac{3}{4}"),
        ("\\boxed{\\text{(A)}} and then \\boxed{x^{2}+1}", "math", "x^{2}+1"),
        ("\\boxed 5$", "math", "5"),
        ("unbalanced \\boxed{\\frac{1}{2}", "math", None),
        ("\\fbox{7}", "math", "7"),
        ("Answer: 164", "answer", "164"),
        ("17+25=42\nAnswer: 42\n", "answer", "42"),
        ("The answer is 12 apples.", "answer", "12 apples"),
        ("The final answer is $5$. I hope it is correct.", "answer", "$5$"),
        ("**Answer:** 9", "answer", "9"),
        ("Answer:\n  7\n", "answer", "7"),
        ("Answer:", "answer", None),
        ("The answer is 2.5. Done.", "answer", "2.5"),
        ("<answer> yes </answer>", "tag", "yes"),
        ("a 3 b -4.5 c", "last_number", "-4.5"),
        ("total 1,234 and 3/4", "last_number", "3/4"),
        # auto: the marker that comes last wins.
        ("The answer is 5.\n#### 6", "auto", "6"),
        ("#### 6\nActually the answer is 7.", "auto", "7"),
        ("The answer is $\\boxed{8}$.", "auto", "8"),
        ("Answer: \\boxed{9}", "auto", "9"),
        ("<answer>10</answer>", "auto", "10"),
        ("nothing to see", "auto", None),
        ("", "auto", None),
    ],
)
def test_extract_answer(text, style, expected):
    assert extract_answer(text, style) == expected


def test_extract_answer_rejects_unknown_style():
    with pytest.raises(ValueError, match="unknown answer style"):
        extract_answer("#### 1", "bogus")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1,234", "1234"),
        ("$1,234.00", "1234"),
        ("\\$5", "5"),
        ("2.50", "2.5"),
        ("2.5", "2.5"),
        ("0.125", "0.125"),
        (".5", "0.5"),
        ("-7", "-7"),
        ("+3", "3"),
        ("- 3", "-3"),
        ("\u22123", "-3"),
        ("-0", "0"),
        ("30%", "30"),
        ("30\\%", "30"),
        ("12 apples", "12"),
        ("5 km", "5"),
        ("60 km/h", "60"),
        ("\\text{5 cm}^2", "5"),
        ("3/4", "0.75"),
        ("10/4", "2.5"),
        ("1/3", "1/3"),
        ("-2/6", "-1/3"),
        ("\\frac{3}{4}", "0.75"),
        ("\\dfrac{1}{3}", "1/3"),
        ("\\tfrac{2}{3}", "2/3"),
        ("-\\frac{1}{2}", "-0.5"),
        ("\\frac{-1}{2}", "-0.5"),
        ("\\frac12", "0.5"),
        ("\\boxed{42}", "42"),
        ("$\\boxed{\\text{42}}$.", "42"),
        ("42.", "42"),
        ("x = 5", "5"),
        ("1/0", "1/0"),
        # Not numbers: algebra and tuples keep their text, minus decoration.
        ("2x", "2x"),
        ("2 pi", "2 pi"),
        ("1,2", "1,2"),
        ("(1, 2)", "(1,2)"),
        ("\\left( 3, 4 \\right)", "(3,4)"),
        ("\\sqrt{2}", "\\sqrt{2}"),
        ("\\text{(A)}", "(A)"),
        ("  Yes  ", "Yes"),
        ("a = 1, b = 2", "a=1,b=2"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("2.50", "2.5", True),
        ("5/2", "\\frac{5}{2}", True),
        ("\\dfrac{5}{2}", "2.5", True),
        ("1,234", "1234", True),
        ("$1234", "1234", True),
        ("12 apples", "12", True),
        ("-3", "3", False),
        ("0.333", "1/3", False),
        ("30%", "30", True),
        ("30%", "0.3", False),
        ("(1,2)", "(1, 2)", True),
        ("2x", "2", False),
        ("\\text{(A)}", "(A)", True),
        (None, "5", False),
        ("5", None, False),
        ("", "", False),
        ("1e3", "1000", False),
    ],
)
def test_answers_match(prediction, reference, expected):
    assert answers_match(prediction, reference) is expected


def test_parse_number_is_exact():
    assert parse_number("0.1") == Fraction(1, 10)
    assert parse_number("$1,000,000.5") == Fraction(2000001, 2)
    assert parse_number("\\frac{22}{7}") == Fraction(22, 7)
    assert parse_number("apples") is None
    assert parse_number("3 pi") is None


def test_has_final_answer():
    assert has_final_answer("#### 5\n")
    assert has_final_answer("Answer: 5\n", "answer")
    assert not has_final_answer("17+25=42\n", "answer")
    assert not has_final_answer("#### 5", "math")


def test_split_solution_keeps_delimiter_and_drops_blank_lines():
    assert split_solution("a\n\nb\n  \nc") == ("a\n", "b\n", "c\n")
    assert split_solution("a|b|", "|") == ("a|", "b|")
    assert split_solution("\n\n") == ()


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_extraction_is_total_and_normalize_is_idempotent(text):
    for style in ("auto", "gsm8k", "math", "answer", "tag", "last_number"):
        answer = extract_answer(text, style)
        assert answer is None or (answer == answer.strip() and answer)
    normalized = normalize_answer(text)
    assert normalize_answer(normalized) == normalized
    assert answers_match(text, text) == bool(normalized)


_latexish = st.text(alphabet="0123456789+-.,/$%{}\\ abcxfrac()boxedtext=\u2212", max_size=30)


@settings(max_examples=300, deadline=None)
@given(_latexish)
def test_normalize_is_idempotent_on_answer_like_text(text):
    normalized = normalize_answer(text)
    assert normalize_answer(normalized) == normalized
    value = parse_number(text)
    if value is not None:
        assert parse_number(normalized) == value


@settings(max_examples=200, deadline=None)
@given(st.fractions(min_value=-(10**9), max_value=10**9, max_denominator=10**6))
def test_numbers_roundtrip_through_their_canonical_form(value):
    canonical = normalize_answer(str(value))
    assert parse_number(canonical) == value
    assert answers_match(canonical, f"{value.numerator}/{value.denominator}")


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_integers_with_thousands_commas(value):
    assert normalize_answer(f"{value:,}") == str(value)
    assert answers_match(f"#### {value:,}".split("#### ")[1], str(value))
