"""MobileViT training: model, data pipeline, and the train / evaluate / export command lines."""

from training.model import VARIANTS, build_model

__all__ = ["VARIANTS", "build_model"]
