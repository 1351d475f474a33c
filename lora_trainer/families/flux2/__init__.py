"""The flux2 family folder (FLUX.2 dev): see families/README.md."""
