"""Where an image is anomalous: the window holding the largest share of its squared reconstruction
error. Pure numpy: two batched matrix products with a band matrix of ones, cheap enough for the worker.

Only square images (D = side x side) have a region; for any other D there is none. A box is
`x0,y0,x1,y1` in pixels of the side x side grid, x1 and y1 exclusive (x is the column).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np


def square_side(input_dim: int) -> int | None:
    """The side of a square image of `input_dim` pixels, or None when D is not a square."""
    side = math.isqrt(input_dim)
    return side if side > 1 and side * side == input_dim else None


def default_window(side: int) -> int:
    """The window's side: a quarter of the image's (7 pixels on 28 x 28), at least 1."""
    return max(1, side // 4)


@dataclass(frozen=True)
class Regions:
    """Per row: the box (x0, y0, x1, y1), exclusive ends, and the share of the row's error in it."""

    boxes: np.ndarray  # (n, 4) int
    shares: np.ndarray  # (n,) float64 in [0, 1]

    def field(self, i: int) -> str:
        """Row i's `region` field: `x0,y0,x1,y1`."""
        x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
        return f"{x0},{y0},{x1},{y1}"

    def fields(self) -> list[str]:
        """Every row's `region` field, as `field` gives it (one conversion for the batch)."""
        return [f"{x0},{y0},{x1},{y1}" for x0, y0, x1, y1 in self.boxes.tolist()]


def locate_regions(squared_error: np.ndarray, side: int, window: int | None = None) -> Regions:
    """The window (side `window`, every position) with the largest sum of each row's squared error.

    `squared_error` is (n, side*side), row-major. A row without error (all zeros) gets the
    top-left window and share 0. Ties go to the first window in row-major order.
    """
    errors = np.asarray(squared_error)
    n = errors.shape[0]
    if errors.ndim != 2 or errors.shape[1] != side * side:
        raise ValueError(
            f"squared errors have shape {errors.shape}, expected (n, {side * side}) for side {side}"
        )
    w = default_window(side) if window is None else window
    if not 1 <= w <= side:
        raise ValueError(f"region window {w} must be between 1 and the image side {side}")
    # Every window's sum at once: band @ image @ band.T, band[i] holding ones over columns i..i+w-1.
    # Two small matrix products per image (BLAS) cost less than running sums along both axes, and
    # float32 is plenty to tell the largest window of at most a few thousand pixels.
    band = _band(side, w)
    grid = errors.reshape(n, side, side).astype(np.float32, copy=False)
    flat = (band @ grid @ band.T).reshape(n, -1)
    best = flat.argmax(axis=1)
    positions = side - w + 1
    boxes = np.empty((n, 4), np.int64)
    boxes[:, 1], boxes[:, 0] = np.divmod(best, positions)  # y0, x0
    boxes[:, 2:] = boxes[:, :2] + w
    top = flat.max(axis=1).astype(np.float64)
    total = errors.sum(axis=1, dtype=np.float64)
    # Zero error: share 0. The window's float32 sum may round a hair above the float64 total.
    shares = np.minimum(top / np.maximum(total, np.finfo(np.float64).tiny), 1.0) * (total > 0)
    return Regions(boxes, shares)


@functools.lru_cache(maxsize=8)
def _band(side: int, window: int) -> np.ndarray:
    """(side - window + 1, side) float32: row i is 1 on columns i .. i + window - 1."""
    positions = side - window + 1
    offsets = np.arange(side)[None, :] - np.arange(positions)[:, None]
    band = ((offsets >= 0) & (offsets < window)).astype(np.float32)
    band.flags.writeable = False
    return band
