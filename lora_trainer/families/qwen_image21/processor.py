"""A text-only stand-in for Qwen3VLProcessor, for text-to-image prompts.

QwenImage21Pipeline tokenizes through its ``processor`` (a Qwen3VLProcessor: the Qwen2 tokenizer, an image processor
and a video processor). transformers 5.24 cannot build that processor without torchvision (its video processor
needs it), which this trainer does not install (requirements.txt), and a text-to-image prompt uses none of the
image half: with text only, Qwen3VLProcessor.__call__ is its tokenizer's call and apply_chat_template renders the
chat template and tokenizes it. This class is that: ``__call__`` (text only), ``apply_chat_template`` (the
ProcessorMixin one, batched as the pipeline indexes it) and ``.tokenizer`` -- the same ids for every prompt the
pipeline builds without condition images. The trainer loads a real folder's ``processor/`` tokenizer files into
it; diffusers saves and loads it as a ProcessorMixin (the tiny folders)."""
from __future__ import annotations

from transformers import ProcessorMixin


class Qwen3VLTextProcessor(ProcessorMixin):
    attributes = ["tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(self, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(tokenizer, chat_template=chat_template or getattr(tokenizer, "chat_template", None))

    def __call__(self, text=None, images=None, videos=None, audio=None, **kwargs):
        if images is not None or videos is not None or audio is not None:
            raise ValueError("Qwen3VLTextProcessor encodes text prompts only (no condition images: text-to-image "
                             "training); an image-conditioned prompt needs transformers' Qwen3VLProcessor")
        # Qwen3VLProcessor batches a single string (its apply_chat_template result is then indexed [0]).
        return self.tokenizer([text] if isinstance(text, str) else text, **kwargs)
