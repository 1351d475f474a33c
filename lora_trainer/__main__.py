"""``python -m lora_trainer --config config.json``: the same CLI as train_lora.py."""
import sys

from .cli import main

sys.exit(main())
