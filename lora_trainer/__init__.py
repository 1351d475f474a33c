"""LoRA trainer for diffusion models (the families in ``lora_trainer.families``), driven through a JSON config
and a stream of JSON events.

Layout, by role: ``cli`` and ``contract/`` (events, errors, exit codes); ``config/``; ``preflight/`` (the
torch-free ``--validate-only`` audit, with ``preflight/probe/``); ``families/`` (one folder per model family behind
one registry); ``objectives/``; ``data/``; ``adapters/`` (LoRA layers); ``training/`` (the recipe); ``runtime/``
(device, loading, quantisation, streaming, signals); ``distributed/``; ``outputs/``; ``testing/`` (tiny models).
"""

__version__ = "0.1.0"
