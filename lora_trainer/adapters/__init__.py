"""The trainable layers: PEFT LoRA / DoRA injection and plain state (lora.py), and starting from an existing LoRA
file (init_from_file.py). Imports neither distributed/ nor training/."""
