"""Benchmarks: each script measures one thing and prints markdown (see BENCHMARKS.md). Run them from the
repository root as modules, ``python -m bench.bench_inference [...]``; ``bench.common`` holds what they
share, and the stand-in networks and Slicer parts they use are ``standins`` (shared with the tests)."""
