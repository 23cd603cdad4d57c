"""Trace-replay benchmark harness: `python -m benchmarks replay|compare ...`."""
