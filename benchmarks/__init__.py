"""The benchmarks' one entry point: `python -m benchmarks` or `python benchmarks/run.py`.

Thin on purpose: the benchmarks live in vmmiod/bench/ (installed with the package, so
`vmmiod bench` works from any install); this folder only gives a checkout the usual handle.
"""
