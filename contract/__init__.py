"""The formats other programs rely on: input, output and dead-letter entries, shards, labels."""
