"""The machine and the files under a run: device and precision, loading (no pickles, the hub), single-file
checkpoints, quantised bases, block streaming, signals, the run lock."""
