"""The sd15 family folder: see families/README.md."""
