"""The flux2_klein family folder (FLUX.2 klein 4B / 9B, base and distilled): see families/README.md."""
