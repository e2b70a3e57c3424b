"""The replicated session table (pure) and its Raft log (``replication.raft``)."""
