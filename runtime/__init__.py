"""What every process of the fleet shares: settings from ANOMALY_* variables, the Redis connection,
logs and the command-line preamble."""
