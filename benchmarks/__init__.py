"""Benchmarks: `make bench` (python -m benchmarks.throughput) and `make bench-quick`."""
