"""Checks of the files under deploy/ (Dockerfile, compose, Kubernetes, Prometheus, Grafana)."""
