"""Benchmarks behind `python jobs/benchmark.py <name>`; each module has main(argv) -> int."""
