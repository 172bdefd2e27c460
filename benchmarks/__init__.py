"""Latency, memory and accuracy benchmarks."""
