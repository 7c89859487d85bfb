"""What the aggregation server and client nodes must agree on: schemas, models, codecs, privacy math."""
