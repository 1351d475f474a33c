"""The chroma family folder: see families/README.md."""
