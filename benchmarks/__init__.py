"""Benchmarks of ncl (pytest-benchmark); see README.md.

A package so that its modules import as `benchmarks.*`: spawned peer ranks unpickle their
work from them by that name, and `test_collectives.py` does not clash with the test suite's.
"""
