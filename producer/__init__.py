"""The producer side of the input stream: `ImageProducer` and `anomaly-producer`."""
