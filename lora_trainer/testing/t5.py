"""The tiny T5 tokenizer and encoder FLUX.1 and SD3 share (a leaf: families/<name>/tiny.py import it).

The tokenizer is self-made (a Unigram model over a small fixed vocabulary, no sentencepiece needed).
Real values in the comments: t5-v1_1-xxl, d_model 4096, d_ff 10240, 64 heads x 64, 24 layers, gated-gelu,
vocab 32128.
"""

from __future__ import annotations

from .parts import _WORDS

T5_VOCAB_SIZE = 512  # tokenizer size == embedding rows (real: 32100 tokens, 32128 rows)
T5_D_MODEL = 64  # = joint_attention_dim of both transformers
T5_D_FF = 128
T5_NUM_HEADS, T5_D_KV = 4, 16
T5_LAYERS = 2
T5_MAX_LENGTH = 512  # tokenizer model_max_length, as the real one (FluxPipeline rejects > 512)
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as in real T5

_ASCII = [chr(c) for c in range(ord("!"), ord("~") + 1)]  # printable, no space
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Unigram log-probabilities: whole words beat any split into pieces, so captions
# tokenize to realistic lengths; lone characters keep every ASCII text encodable.
_WORD_SCORE, _SPACE_WORD_SCORE, _BIGRAM_SCORE, _CHAR_SCORE, _SPACE_SCORE = -6.0, -4.0, -8.0, -10.0, -5.0


def t5_vocab(vocab_size: int = T5_VOCAB_SIZE) -> list[tuple[str, float]]:
    """The tiny T5 vocabulary as (piece, score) pairs, sentencepiece-style ("▁" marks a word start).

    Layout like real T5: <pad>=0, </s>=1, <unk>=2, then pieces. Words from
    parts._WORDS (with and without "▁"), every printable ASCII character (with
    and without "▁"), then letter bigrams up to exactly `vocab_size`. Characters
    outside ASCII map to <unk>, as characters unseen by real T5's sentencepiece do.
    """
    pieces: dict[str, float] = {T5_PAD: 0.0, T5_EOS: 0.0, T5_UNK: 0.0, "▁": _SPACE_SCORE}

    def add(piece: str, score: float) -> None:
        if piece not in pieces and len(pieces) < vocab_size:
            pieces[piece] = score

    for w in _WORDS:
        add("▁" + w, _SPACE_WORD_SCORE)
    for w in _WORDS:
        add(w, _WORD_SCORE)
    for c in _ASCII:
        add(c, _CHAR_SCORE)
    for c in _ASCII:
        add("▁" + c, _CHAR_SCORE + 1.0)
    for a in _LETTERS:
        for b in _LETTERS:
            add(a + b, _BIGRAM_SCORE)
    if len(pieces) != vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is not reachable with the built-in pieces")
    return list(pieces.items())


def make_tiny_t5_tokenizer(vocab_size: int = T5_VOCAB_SIZE):
    """A T5 tokenizer (Unigram + Metaspace, eos appended) over `t5_vocab`; no sentencepiece, no hub.

    transformers 5's T5Tokenizer (T5TokenizerFast is the same class) rebuilds its
    normalizer/pre-tokenizer/decoder from the vocab on every load, so building it
    from `vocab=` makes the saved folder reload to exactly this tokenizer.
    """
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocab(vocab_size), eos_token=T5_EOS, unk_token=T5_UNK, pad_token=T5_PAD,
                           extra_ids=0, model_max_length=T5_MAX_LENGTH)


def t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=T5_VOCAB_SIZE, d_model=T5_D_MODEL, d_ff=T5_D_FF, d_kv=T5_D_KV, num_heads=T5_NUM_HEADS,
        num_layers=T5_LAYERS, feed_forward_proj="gated-gelu",  # T5 v1.1: wi_0/wi_1/wo
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
