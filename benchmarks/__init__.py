"""Benchmarks and demos: run as `python -m benchmarks.<name>`."""
