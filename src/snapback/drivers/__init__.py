"""Drivers: the edge where snapback talks to storage, hypervisors and tools."""
