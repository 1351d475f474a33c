"""The krea2 family folder: see families/README.md."""
