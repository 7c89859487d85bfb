"""The control service's identity, roles and audit log: who may act on the federation, and a record of what they did."""
