"""Benchmarks: `python -m benchmarks.<name>`; each writes a JSON of its figures."""
