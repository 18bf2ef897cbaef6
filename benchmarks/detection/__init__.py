"""Detection benchmark: does each detector catch the anomalies, and what does it cost to serve?

`python -m benchmarks.detection` trains the detectors of `configs.DETECTORS` on MNIST (the
reference notebooks' presets, the previous default, the default, the most accurate), scores the
anomaly kinds of `kinds` as the worker does (numpy engine), serves each through a real worker and
Redis next to the bare consumer loop (`benchmarks.throughput`), runs the one-class protocol on
MNIST and Fashion-MNIST, and writes the Pareto table to benchmarks/results/detection.{json,md}.
"""
