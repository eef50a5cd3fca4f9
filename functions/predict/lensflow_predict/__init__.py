"""The predict function: an upload event in, a prediction event out (entry point: main.py)."""
