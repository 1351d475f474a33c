"""The qwen_image21 family folder: see families/README.md."""
