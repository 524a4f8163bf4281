"""Benchmarks: each prints its figures with a baseline measured in the same run, and the ratio."""
