"""ONNX: export of a run's nets (export) and their use with ONNX Runtime (runtime)."""
