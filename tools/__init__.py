"""Benchmark and device tooling, outside the installed package; the Makefile drives it."""
