"""Speed and memory of deepatlas_fast against what users would otherwise run.

`python -m benchmarks` prints the tables; see benchmarks/__main__.py."""
