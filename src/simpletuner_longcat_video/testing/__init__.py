"""Helpers for the tests, the demo and the benchmarks: tiny checkpoints and datasets, the learning
check, the host's server. The product never imports this subpackage."""
