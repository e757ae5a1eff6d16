"""Metrics (Prometheus, across processes) and logging set-up."""
