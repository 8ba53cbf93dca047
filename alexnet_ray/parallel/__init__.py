"""Topology, process groups, the cross-connect exchanges, micro-batch schedule, data-parallel sync."""
