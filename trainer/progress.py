"""One log line per training epoch, for runs nobody watches on a terminal (a Kubernetes Job, compose):
there Keras draws no progress bar, and "slow" and "hung" would look the same."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("trainer.progress")


def log_epoch(network: str, epoch: int, epochs: int, metrics: Mapping[str, Any], started: float) -> None:
    """`epoch network=... epoch=3 epochs=20 loss=... val_loss=... elapsed_seconds=...`."""
    log.info(
        "epoch network=%s epoch=%d epochs=%d loss=%.6g val_loss=%.6g elapsed_seconds=%.1f",
        network,
        epoch,
        epochs,
        float(metrics.get("loss", float("nan"))),
        float(metrics.get("val_loss", float("nan"))),
        time.monotonic() - started,
    )


def epoch_callbacks(network: str, epochs: int, verbose: int) -> list[Any]:
    """A Keras callback logging each epoch (`log_epoch`) when Keras itself shows nothing (verbose 0)."""
    if verbose:
        return []
    import keras

    started = time.monotonic()

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            log_epoch(network, epoch + 1, epochs, logs or {}, started)

    return [EpochLog()]
