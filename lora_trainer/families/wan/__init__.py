"""The wan family folder (Wan 2.1 text-to-video; Wan 2.2 next): see families/README.md and STATUS.md."""
