"""The sdxl family folder: see families/README.md."""
