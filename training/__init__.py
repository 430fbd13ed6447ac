"""MobileViT training: model, data pipeline, and the train / evaluate / export command lines.

Importing the package imports nothing else: `python -m training.device` must start where Keras
is not installed yet (a lent GPU machine)."""
