"""The qwen_image family folder: see families/README.md."""
