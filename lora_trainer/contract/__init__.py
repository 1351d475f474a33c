"""What a parent process relies on: the stdout event stream (events.py), error classes and exit codes (errors.py),
the human rendering of events (human.py). Torch-free."""
