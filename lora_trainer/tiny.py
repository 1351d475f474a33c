"""``python -m lora_trainer.tiny``: tiny random pipelines and datasets for tests, the demo and benchmarks (kept
at this path for the README and scripts; the builders live in lora_trainer/testing/)."""
import sys

from .testing.tiny import main, make_dataset, make_single_file_checkpoint, make_tiny_pipeline

__all__ = ["main", "make_dataset", "make_single_file_checkpoint", "make_tiny_pipeline"]

if __name__ == "__main__":
    sys.exit(main())
