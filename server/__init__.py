"""The aggregation server: round loop, reply validation, aggregation, run store."""
