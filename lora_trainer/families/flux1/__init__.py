"""The flux1 family folder: see families/README.md."""
