"""What a run leaves behind: the LoRA files and their metadata (export.py, lora_files.py), the final export and
manifest (final.py), the model card, report and plots."""
