"""lmdistill: distill a large language model into a smaller one, and prove what the student kept."""

__version__ = "0.1.0"
