"""The train function: a tick in, one training round's report out (entry point: main.py)."""
