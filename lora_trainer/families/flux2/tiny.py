"""The tiny random FLUX.2-dev pipeline, built offline for tests, the demo and benchmarks: Flux2Pipeline over a tiny
Mistral3ForConditionalGeneration (a 31-layer text model, so the pipeline's own text_encoder_out_layers default
(10, 20, 30) reads intermediate layers as on the real 40-layer Mistral Small 3.1) and a byte-level tokenizer with
Mistral's special tokens and a chat template of the real one's shape ([SYSTEM_PROMPT] ... [/SYSTEM_PROMPT][INST] ...
[/INST], list-of-parts content).

The real pipeline's ``tokenizer`` is a PixtralProcessor, whose image processor needs torchvision, which this trainer
does not install (requirements.txt). Prompts carry no images, so the processor only renders the chat template and
runs its tokenizer (without adding a second BOS: the template starts with it): the tiny pipeline, and the trainer
loading a real folder (flux2/spec.py), take that tokenizer alone, which gives the same ids."""
from __future__ import annotations

from ...testing.parts import seeded
from ...testing.qwen import QWEN_VOCAB_SIZE, qwen_vocab_and_merges
from .._flux2 import tiny as parts

VARIANTS = {"flux2-dev": "dev"}
DEFAULT = "flux2-dev"

MISTRAL_HIDDEN, MISTRAL_LAYERS = 16, 31  # real 5120 wide, 40 layers
DEPTH = (1, 6)  # double, single blocks: dev's ratio (real 8 + 48)
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
            "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
# Mistral Small 3.1's template reduced to what Flux2Pipeline.format_input sends: a system message and user turns whose
# content is a string or a list of {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + content + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + content + '[/INST]' }}"
    "{%- else %}{{- content + eos_token }}{%- endif %}{%- endfor %}")


def make_tiny_mistral_tokenizer(max_length: int = 1024):
    """A byte-level BPE PreTrainedTokenizerFast (the tiny Qwen vocabulary plus Mistral's special tokens), padding
    with <pad> on the right."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = qwen_vocab_and_merges()
    for s in SPECIALS:
        vocab[s] = len(vocab)
    if len(vocab) > QWEN_VOCAB_SIZE:
        raise ValueError(f"tiny Mistral vocab has {len(vocab)} tokens, more than {QWEN_VOCAB_SIZE}")
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=max_length)
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _mistral3(image_token_id: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", hidden_size=MISTRAL_HIDDEN, intermediate_size=32,
                         num_hidden_layers=MISTRAL_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         vocab_size=QWEN_VOCAB_SIZE, max_position_embeddings=1024, sliding_window=None),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, patch_size=14, image_size=28),
        image_token_index=image_token_id))


def build(variant: str = "dev", seed: int = 0):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched."""
    from diffusers import Flux2Pipeline

    if variant != "dev":
        raise ValueError(f"unknown tiny FLUX.2 variant {variant!r}; expected dev")
    with seeded(seed):
        tok = make_tiny_mistral_tokenizer()
        return Flux2Pipeline(
            scheduler=parts.scheduler(), vae=parts.vae(), text_encoder=_mistral3(tok.convert_tokens_to_ids("[IMG]")),
            tokenizer=tok,
            transformer=parts.transformer(double=DEPTH[0], single=DEPTH[1], text_width=MISTRAL_HIDDEN, guidance=True))
