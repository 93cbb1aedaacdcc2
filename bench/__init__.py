"""Benchmark suite of the Durable Streams gateway; run it with `bench/run`."""
