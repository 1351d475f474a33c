#!/usr/bin/env python3
"""train_lora: LoRA training for diffusion models (SD1.x, SD2.x, SDXL, FLUX.1, SD3/3.5) that other programs can drive.

Usage: python3 train_lora.py --config config.json [--validate-only] [--resume] [--debug]
Everything lives in the lora_trainer package; this file only hands over to its CLI.
"""
import sys

from lora_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
