"""Round protocols: one aggregation mode per file (see ``base.RoundProtocol``)."""
