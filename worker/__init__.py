"""The streaming anomaly scorer's worker: reads images from a Redis stream, scores, publishes."""
