"""Latency / memory / analytic-FLOPs measurement, always against a baseline measured in the same process."""
