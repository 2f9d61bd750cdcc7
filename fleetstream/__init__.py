"""fleetstream: fleet and asset tracking stream processor."""

__version__ = "0.1.0"
