"""anomaly-notify: tells people about anomalies. A consumer group of its own on the output stream of
every shard; each anomaly posted to a webhook, Alertmanager, a CloudEvents sink or Slack, acked
only once the receiver took it."""
