"""The sd2 family folder: see families/README.md."""
