"""Cluster configuration, the local launcher, admin plumbing and the CLI."""
