"""Benchmark and demo data (CellBench, generated worlds) and the scoring the benchmarks share."""
