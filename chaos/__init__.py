"""Chaos harness (Jepsen-style): nemeses, workload, history, checkers."""
