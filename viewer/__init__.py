"""anomaly-viewer: the operator's page of the latest anomalies, and one-click labels."""
