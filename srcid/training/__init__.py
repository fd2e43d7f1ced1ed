"""Data readers, the training loop, export and evaluation."""
