"""A character-level tokenizer built in code, for the tiny from-scratch policy.

One token per character of a fixed alphabet, plus ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>``. It is a real
:class:`transformers.PreTrainedTokenizerFast`, so everything downstream (sampler, verifiers, ``save_pretrained``)
treats it like any Hugging Face tokenizer. One token per character makes step ends trivially token-aligned: the
``"\\n"`` that ends a step is always its own token.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``alphabet``.

    Ids 0-3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; the distinct characters of ``alphabet`` follow in
    sorted order (so the same set of characters always gives the same ids). Encoding prepends ``<bos>``
    (``add_special_tokens=True``, the default) and never appends ``<eos>``; a trainer that wants the model to
    learn to stop appends ``tokenizer.eos_token_id`` itself. Characters outside the alphabet map to ``<unk>``.
    ``decode(encode(s), skip_special_tokens=True) == s`` for every ``s`` over the alphabet, spaces and
    newlines included.

    Args:
        alphabet: Every character the tokenizer must know; duplicates are ignored.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``pad/bos/eos/unk`` tokens set.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = sorted(set(alphabet))
    if not chars:
        raise ValueError("alphabet is empty: pass every character the tokenizer must encode")
    clash = [c for c in chars if c in SPECIAL_TOKENS]
    if clash:
        raise ValueError(f"alphabet characters {clash} clash with special tokens")
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in chars:
        vocab[char] = len(vocab)

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # `[\s\S]` matches any one character, newline included, so every character becomes its own piece.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins pieces with no separator; the default WordLevel decoding would insert spaces between them.
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
