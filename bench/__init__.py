"""Benchmarks: ``python -m bench NAME [--quick] [--json] [--out DIR]``; ``python -m bench list``.

Each bench starts its own cluster of real node processes on free ports in a
temporary directory and stops them all when it ends. See docs/benchmarks.md.
"""
