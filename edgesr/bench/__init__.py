"""Latency benchmarking (being implemented)."""
