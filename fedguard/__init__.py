"""The ``fedguard`` command line: orchestrates server and client pieces (simulation, demo)."""

__version__ = "0.1.0"
