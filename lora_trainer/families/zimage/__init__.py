"""The zimage family folder: see families/README.md."""
