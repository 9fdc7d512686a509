"""Benchmarks of chatmw: run ``python -m bench.run_all`` to regenerate docs/benchmarks.md.

Benchmarks are not tests: they live outside ``tests/`` and the test suite never runs them.
"""
