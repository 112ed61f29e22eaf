"""A trained run at work: loading it, segmenting and registering images, evaluating it.

    from deepatlas_fast.inference import evaluate, load_run
"""
from .evaluation import evaluate
from .run import Run, load_run

__all__ = ["Run", "load_run", "evaluate"]
