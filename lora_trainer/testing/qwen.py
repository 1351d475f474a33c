"""A tiny byte-level Qwen2 tokenizer with a chat template, built offline, for the families whose text encoders are
Qwen LMs (Qwen-Image's Qwen2.5-VL, Z-Image's and FLUX.2 klein's Qwen3): the pipelines tokenize through
``Qwen2Tokenizer`` and (Z-Image, klein) ``apply_chat_template(..., enable_thinking=...)``, so the tiny tokenizer
keeps the real special tokens and a template of the real one's shape (system / user / assistant turns with
``<|im_start|>`` / ``<|im_end|>``, the generation prompt, the empty think block when thinking is off).

The vocabulary is GPT-2's byte table (what Qwen's BPE is built on) plus merges for the common caption words, so a
caption is a realistic handful of tokens, not one per byte. torch-free; transformers is imported in the function.
"""
from __future__ import annotations

from .parts import _WORDS

# Qwen2's special tokens, in their real order after the vocabulary.
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "<think>", "</think>")
QWEN_VOCAB_SIZE = 1024  # text encoders' embedding tables: at least len(vocab); a round figure above it

# Qwen3's template, reduced to what the pipelines use: a system message, user turns, the generation prompt, and
# enable_thinking=False's empty think block (Qwen3 writes it so the model answers without reasoning).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def qwen_vocab_and_merges(extra_words: tuple[str, ...] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE in GPT-2's space convention ("Ġ" marks a leading space): 256 byte symbols, merges for the
    caption words (and ``extra_words``) with and without a leading space, then the special tokens."""
    # GPT-2's table: printable bytes map to themselves, the rest to code points from 256 up (space -> "Ġ").
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    char = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}
    tokens = [char[b] for b in range(256)]
    known, merges = set(tokens), []

    def add(a: str, b: str) -> None:
        if a + b not in known:
            tokens.append(a + b)
            known.add(a + b)
            merges.append((a, b))

    space = char[ord(" ")]  # "Ġ"
    for word in (*extra_words, *_WORDS):  # extra words first: their merges rank first, so they come out whole
        add(space, word[0])
        for syms in (list(word), [space + word[0], *word[1:]]):
            cur = syms[0]
            for s in syms[1:]:
                add(cur, s)
                cur += s
    vocab = {t: i for i, t in enumerate(tokens)}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    if len(vocab) > QWEN_VOCAB_SIZE:
        raise ValueError(f"tiny Qwen vocab has {len(vocab)} tokens, more than QWEN_VOCAB_SIZE {QWEN_VOCAB_SIZE}")
    return vocab, merges


def make_tiny_qwen_tokenizer(max_length: int = 1024, extra_words: tuple[str, ...] = ()):
    """A Qwen2Tokenizer over the tiny vocab, padding with <|endoftext|> on the right as the real one does.
    ``extra_words`` get whole-word tokens too: a pipeline that drops a fixed count of template tokens (Qwen-Image's
    34) needs its template's words to be one token each, as the real vocabulary has them."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab_and_merges(extra_words)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=max_length,
                         extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                               "vision_start_token": "<|vision_start|>",
                                               "vision_end_token": "<|vision_end|>"})
    # In the vocabulary already: registering them as special keeps "<|im_start|>" one token, never split.
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok
