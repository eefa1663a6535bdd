"""Benchmarks and demos: run as `python -m attention_kernels.benchmarks.<name>`."""
