"""Benchmarks for raymerge (scripts, not tests): run with ``python -m benchmarks.<name> --help``."""
