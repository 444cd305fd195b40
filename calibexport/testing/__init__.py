"""Exact reference problems for tests and benchmarks (numpy only)."""
