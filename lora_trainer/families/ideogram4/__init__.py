"""The ideogram4 family folder (Ideogram 4): see families/README.md."""
