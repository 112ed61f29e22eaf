"""ONNX: export of a run's nets (export) and their use with ONNX Runtime (runtime).

    from deepatlas_fast.deploy import export_run, load_onnx
"""
from .export import export_run
from .runtime import OnnxRun, load_onnx

__all__ = ["export_run", "load_onnx", "OnnxRun"]
