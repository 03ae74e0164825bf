"""Step segmentation and step-to-token alignment, with real Hugging Face tokenizers built offline in code."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pavlit.steps import (
    StepTokens,
    gather_positions,
    join_steps,
    pad_step_batch,
    split_steps,
    step_end_token_indices,
)

ALPHABET = "ab c.1+=?\n"
CORPUS = ["Step 1: add 3 and 4.\nStep 2: get 7.\n\nThe answer is 7.\n"] * 50 + ["x = 12.\ny = x + 3.\n\n#### 15\n"] * 50
CORPUS += ["ab c.\n1+1=2?\n\nab\n", "a.\nb.\n\nc.\n"] * 40

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _wrap(tokenizer: Tokenizer, **special: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


@functools.cache
def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, BOS prepended: prefix-stable at every character."""
    vocab = {"<bos>": 0, "<pad>": 1, "<unk>": 2} | {ch: i + 3 for i, ch in enumerate(ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return _wrap(tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")


@functools.cache
def line_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE within lines (pre-split after every newline), no special tokens: prefix-stable at line ends."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="merged_with_previous"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return _wrap(tok, pad_token="<pad>")


# Merges chosen so that "\n" joins text on both sides: ".\n" + "b" and "\n" + "a" cross step boundaries.
MERGES = [("a", "b"), (".", "Ċ"), ("Ċ", "Ċ"), ("Ċ", "a"), (".Ċ", "b"), ("ĊĊ", "c"), ("1", "+"), ("c", "."), ("Ġ", "a")]


@functools.cache
def merging_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE over whole texts whose merges join "\\n" with its neighbours, BOS prepended."""
    vocab = {"<bos>": 0, "<pad>": 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in MERGES]:
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return _wrap(tok, bos_token="<bos>", pad_token="<pad>")


@functools.cache
def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """BERT-style WordPiece: drops whitespace, wraps the text in [CLS] ... [SEP]."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return _wrap(tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]")


TOKENIZERS = {
    "char": char_tokenizer,
    "line_bpe": line_bpe_tokenizer,
    "merging_bpe": merging_bpe_tokenizer,
    "wordpiece": wordpiece_tokenizer,
}
# Tokenizers where no token crosses a position right after "\n" and tokenising a prefix that ends there gives a
# prefix of the full ids: pre-tokenisation splits there, and pieces are tokenised independently.
PREFIX_STABLE = ("char", "line_bpe", "wordpiece")


class SlowTokenizer:
    """Hides a fast tokenizer's offsets, to exercise the incremental-tokenisation fallback."""

    is_fast = False

    def __init__(self, fast: PreTrainedTokenizerFast) -> None:
        self.fast = fast

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.fast(text, add_special_tokens=add_special_tokens)["input_ids"]}


texts = st.text(alphabet=ALPHABET, max_size=40)
prompts = st.one_of(st.just(""), st.text(alphabet=ALPHABET, min_size=1, max_size=12).map(lambda s: s + "\n"))


# ---- split_steps -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "delimiter", "expected"),
    [
        ("", "\n", []),
        ("a", "\n", ["a"]),
        ("a\nb\n", "\n", ["a\n", "b\n"]),
        ("a\nb", "\n", ["a\n", "b"]),
        ("a\n\n\nb\nc", "\n", ["a\n\n\n", "b\n", "c"]),
        ("a\n  \nb", "\n", ["a\n  \n", "b"]),
        ("\n\na\nb", "\n", ["\n\na\n", "b"]),
        ("a\n  ", "\n", ["a\n  "]),
        ("\n \n", "\n", ["\n \n"]),
        ("3 6 0 ", " ", ["3 ", "6 ", "0 "]),
        ("x ; y ; ; z", " ; ", ["x ; ", "y ; ", "; z"]),
        ("a||||b", "||", ["a||||", "b"]),
    ],
)
def test_split_steps_hand_cases(response: str, delimiter: str, expected: list[str]) -> None:
    assert split_steps(response, delimiter) == expected


def test_split_steps_rejects_empty_delimiter() -> None:
    with pytest.raises(ValueError, match="delimiter"):
        split_steps("a", "")


@given(response=texts, delimiter=st.sampled_from(["\n", " ", ".\n", "\n\n"]))
@FAST
def test_split_steps_properties(response: str, delimiter: str) -> None:
    steps = split_steps(response, delimiter)
    assert join_steps(steps) == response
    assert all(steps)

    def content(step: str) -> str:
        return step.replace(delimiter, "").strip()

    if content(response):
        assert all(content(step) for step in steps)
    else:
        assert steps == ([response] if response else [])
    for h, step in enumerate(steps[:-1]):
        assert step.endswith(delimiter)
        # A prefix of steps re-splits into itself, so labels of prefixes line up with the full response.
        assert split_steps(join_steps(steps[: h + 1]), delimiter) == steps[: h + 1]


# ---- step_end_token_indices ------------------------------------------------------------------------------------


def _check_alignment(name: str, prompt: str, response: str, result: StepTokens, strict: bool = True) -> None:
    tokenizer = TOKENIZERS[name]()
    steps = split_steps(response)
    encoding = tokenizer(prompt + response, return_offsets_mapping=True, return_special_tokens_mask=True)
    assert result.input_ids == encoding["input_ids"]
    offsets = encoding["offset_mapping"]
    text_tokens = [j for j, special in enumerate(encoding["special_tokens_mask"]) if not special]
    ends = result.prefix_ends
    assert ends == sorted(ends)
    start = len(prompt)
    for step, end in zip(steps, result.step_ends):
        stop = start + len(step)
        token_start, token_stop = offsets[end]
        assert token_start < stop, "the end token starts inside the prefix"
        if strict:
            assert token_stop > start, "the end token overlaps its step"
            assert all(offsets[j][0] >= stop for j in text_tokens if j > end), "no later token starts in the step"
        start = stop
    if any(offsets[j][0] < len(prompt) for j in text_tokens):
        assert offsets[result.prompt_end][0] < len(prompt) and not encoding["special_tokens_mask"][result.prompt_end]
    elif tokenizer.bos_token is not None or tokenizer.cls_token is not None:
        assert result.prompt_end == 0
    else:
        assert result.prompt_end == -1


@pytest.mark.parametrize("name", list(TOKENIZERS))
@given(prompt=prompts, response=texts.filter(lambda s: s.strip()))
@FAST
def test_step_ends_lie_in_their_steps(name: str, prompt: str, response: str) -> None:
    result = step_end_token_indices(prompt, split_steps(response), TOKENIZERS[name]())
    _check_alignment(name, prompt, response, result)


@pytest.mark.parametrize("name", PREFIX_STABLE)
@given(prompt=prompts, response=texts.filter(lambda s: s.strip()))
@FAST
def test_prefixes_of_steps_are_prefixes_of_tokens(name: str, prompt: str, response: str) -> None:
    tokenizer = TOKENIZERS[name]()
    steps = split_steps(response)
    result = step_end_token_indices(prompt, steps, tokenizer)
    n_trailing = 1 if name == "wordpiece" else 0  # [SEP]
    for h, end in enumerate(result.prefix_ends):
        if h == 0 and not prompt:
            continue
        prefix_ids = tokenizer(prompt + join_steps(steps[:h]))["input_ids"]
        assert prefix_ids[: len(prefix_ids) - n_trailing] == result.input_ids[: end + 1]


@pytest.mark.parametrize("name", list(TOKENIZERS))
@given(prompt=prompts, response=texts.filter(lambda s: s.strip()))
@FAST
def test_slow_fallback(name: str, prompt: str, response: str) -> None:
    steps = split_steps(response)
    fast = step_end_token_indices(prompt, steps, TOKENIZERS[name]())
    slow = step_end_token_indices(prompt, steps, SlowTokenizer(TOKENIZERS[name]()))
    if name in PREFIX_STABLE:
        assert slow == fast
    else:
        # Tokens may cross step boundaries; the fallback still picks a token that starts before each step's end.
        _check_alignment(name, prompt, response, slow, strict=False)


def test_char_tokenizer_hand_case() -> None:
    result = step_end_token_indices("Q\n", ["ab\n", "c"], char_tokenizer())
    assert result.input_ids[0] == char_tokenizer().bos_token_id
    assert len(result.input_ids) == 7  # <bos> Q \n a b \n c
    assert (result.prompt_end, result.step_ends) == (2, [5, 6])
    assert step_end_token_indices("Q\n", ["ab\n", "c"], char_tokenizer(), add_special_tokens=False).step_ends == [4, 5]


def test_token_merging_delimiter_with_next_step_counts_for_the_step_it_starts_in() -> None:
    tokenizer = merging_bpe_tokenizer()
    prompt, steps = "Q?\n", ["a.\n", "b c.\n\n", "ab\n", "a"]
    result = step_end_token_indices(prompt, steps, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(result.input_ids)
    assert tokens == ["<bos>", "Q", "?", "Ċa", ".Ċb", "Ġ", "c", ".Ċ", "Ċ", "ab", "Ċa"]
    # "Ċa" starts in the prompt and ends the prompt; ".Ċb" starts in step 1 and ends it; the last step "a" has no
    # token of its own and ends on the token that started in step 3 and covers it.
    assert result.prompt_end == 3
    assert result.step_ends == [4, 8, 10, 10]
    assert step_end_token_indices(prompt, steps, SlowTokenizer(tokenizer)) == result


def test_empty_prompt_without_bos_has_no_prefix_token() -> None:
    result = step_end_token_indices("", ["ab\n", "c"], line_bpe_tokenizer())
    assert result.prompt_end == -1
    assert step_end_token_indices("", ["ab\n"], char_tokenizer()).prompt_end == 0  # BOS scores the empty prefix


def test_step_without_any_token_is_an_error() -> None:
    with pytest.raises(ValueError, match="maps to no token"):
        step_end_token_indices("", ["  "], wordpiece_tokenizer(), add_special_tokens=False)


# ---- padding -----------------------------------------------------------------------------------------------------


@given(
    rows=st.lists(
        st.tuples(prompts, texts.filter(lambda s: s.strip())),
        min_size=1,
        max_size=4,
    ),
    name=st.sampled_from(list(TOKENIZERS)),
)
@FAST
def test_left_and_right_padding_agree(rows: list[tuple[str, str]], name: str) -> None:
    tokenizer = TOKENIZERS[name]()
    items = [step_end_token_indices(p, split_steps(r), tokenizer) for p, r in rows]
    pad_id = tokenizer.pad_token_id
    right = pad_step_batch(items, pad_id, side="right")
    left = pad_step_batch(items, pad_id, side="left")
    width = right.input_ids.shape[1]
    lengths = torch.tensor([len(item.input_ids) for item in items])
    shift = (width - lengths)[:, None]
    assert torch.equal(right.prefix_mask, left.prefix_mask)
    assert torch.equal(left.attention_mask.sum(1), lengths) and torch.equal(right.attention_mask.sum(1), lengths)
    mask = right.prefix_mask
    assert torch.equal((left.prefix_positions - shift)[mask], right.prefix_positions[mask])
    # Both read the same token ids at every real prefix end, and those are the unpadded ends.
    assert torch.equal(
        gather_positions(left.input_ids, left.prefix_positions)[mask],
        right.input_ids.gather(1, right.prefix_positions)[mask],
    )
    for row, item in enumerate(items):
        real = [e for e in item.prefix_ends if e >= 0]
        assert right.prefix_positions[row][mask[row]].tolist() == real
        assert right.input_ids[row, : len(item.input_ids)].tolist() == item.input_ids
        assert (right.input_ids[row, len(item.input_ids) :] == pad_id).all()


def test_pad_step_batch_hand_case() -> None:
    items = [StepTokens([5, 6, 7, 8], 1, [2, 3]), StepTokens([9, 10], -1, [1])]
    right = pad_step_batch(items, pad_id=0)
    assert right.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert right.prefix_positions.tolist() == [[1, 2, 3], [0, 1, 0]]
    assert right.prefix_mask.tolist() == [[True, True, True], [False, True, False]]
    left = pad_step_batch(items, pad_id=0, side="left")
    assert left.input_ids.tolist() == [[5, 6, 7, 8], [0, 0, 9, 10]]
    assert left.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert left.step_ends.tolist() == [[2, 3], [3, 0]]
    hidden = torch.arange(16.0).reshape(2, 4, 2)
    assert gather_positions(hidden, left.step_ends)[1, 0].tolist() == [14.0, 15.0]
    with pytest.raises(ValueError):
        pad_step_batch(items, 0, side="middle")  # type: ignore[arg-type]
