"""Benchmarks and load tests: in-process (pytest-benchmark), over HTTP (locust), and the `scorehost bench` report."""
