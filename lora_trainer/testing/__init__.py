"""Tiny random pipelines, datasets and single files for tests, the demo and benchmarks (python -m lora_trainer.tiny);
each family's builder is its families/<name>/tiny.py."""
