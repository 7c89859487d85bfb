"""Everything that runs on a client node, next to the private data."""
