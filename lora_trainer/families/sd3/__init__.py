"""The sd3 family folder: see families/README.md."""
