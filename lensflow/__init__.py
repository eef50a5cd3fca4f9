"""lensflow: drone photos in, predictions out, on a model that keeps improving."""

__version__ = "0.1.0"
