"""Training of DeepAtlas: config, checkpoints, metrics, the trainer and its run directory.

    from deepatlas_fast.training import train
"""
from .trainer import train

__all__ = ["train"]
