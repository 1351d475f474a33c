"""The recipe (trainer.py: setup / train / save / cleanup) and what only it uses: attaching adapters, optimizer,
guards, sampling, checkpoints, exact resume."""
