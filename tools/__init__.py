"""Operators' tools around the fleet: anomaly-compare, and the demo behind `make demo`."""
