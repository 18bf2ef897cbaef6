"""The viewer's pictures, pure numpy: original, reconstruction and error heatmap of one image, scaled
up, with the region outlined, encoded as PNG (zlib; no imaging library in the worker's install)."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from detector.artifact import LoadedArtifact
from detector.preprocessing import scaling_of
from detector.region import locate_regions, square_side

SCALE = 4  # 28 x 28 digits become 112 x 112 pictures
OUTLINE = (255, 40, 40)


def png(pixels: np.ndarray) -> bytes:
    """A PNG of an (h, w) grey or (h, w, 3) RGB uint8 array."""
    image = np.ascontiguousarray(pixels, np.uint8)
    if image.ndim == 2:
        height, width = image.shape
        colour_type = 0
    elif image.ndim == 3 and image.shape[2] == 3:
        height, width = image.shape[:2]
        colour_type = 2
    else:
        raise ValueError(f"a PNG needs an (h, w) or (h, w, 3) array, found shape {image.shape}")
    rows = image.reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def grey(values: np.ndarray, side: int) -> np.ndarray:
    """[0, 1] pixel values as an RGB picture, scaled up SCALE times."""
    g = (
        (np.clip(np.asarray(values, np.float64), 0.0, 1.0) * 255.0)
        .round()
        .astype(np.uint8)
        .reshape(side, side)
    )
    return np.repeat(np.repeat(np.stack([g, g, g], axis=2), SCALE, axis=0), SCALE, axis=1)


def heat(squared_error: np.ndarray, side: int) -> np.ndarray:
    """Squared error as black -> red -> yellow -> white, scaled to the image's largest error."""
    e = np.asarray(squared_error, np.float64).reshape(side, side)
    top = float(e.max())
    t = e / top if top > 0 else np.zeros_like(e)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=2)
    picture = (rgb * 255).round().astype(np.uint8)
    return np.repeat(np.repeat(picture, SCALE, axis=0), SCALE, axis=1)


def outline(picture: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """A copy of a scaled-up picture with the box (x0, y0, x1, y1 in image pixels) drawn on it."""
    out = picture.copy()
    x0, y0, x1, y1 = (v * SCALE for v in box)
    height, width = out.shape[:2]
    x0, x1 = max(0, x0), min(width, x1)
    y0, y1 = max(0, y0), min(height, y1)
    if x1 <= x0 or y1 <= y0:
        return out
    out[y0:y1, x0 : x0 + 1] = OUTLINE
    out[y0:y1, x1 - 1 : x1] = OUTLINE
    out[y0 : y0 + 1, x0:x1] = OUTLINE
    out[y1 - 1 : y1, x0:x1] = OUTLINE
    return out


def parse_box(text: str, side: int) -> tuple[int, int, int, int] | None:
    """A `region` field as a box inside the side x side grid, or None when it is not one."""
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        return None
    if 0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side:
        return x0, y0, x1, y1
    return None


@dataclass(frozen=True)
class Pictures:
    """The three PNGs of one anomaly."""

    original: bytes
    reconstruction: bytes | None
    heatmap: bytes | None
    region: str | None  # where the viewer's own reconstruction puts it


class Reconstructor:
    """An artifact's dense autoencoder in numpy: pixels in [0, 1] -> reconstruction and error."""

    def __init__(self, artifact: LoadedArtifact) -> None:
        self.model_version = artifact.baseline.model_version
        self.input_dim = artifact.baseline.input_dim
        self.side = square_side(self.input_dim)
        self.stack = artifact.dense_stack
        self.scaling = scaling_of(artifact.baseline.preprocessing)

    def pictures(self, pixels: np.ndarray, region: str | None) -> Pictures:
        """Original, reconstruction and heatmap of one image (D values in [0, 1]); `region` is the
        output entry's, outlined on all three (the viewer's own when the entry has none)."""
        side = self.side
        if side is None or pixels.size != self.input_dim:
            raise ValueError(f"image has {pixels.size} pixels, expected a square image of {self.input_dim}")
        x = np.asarray(pixels, np.float32).reshape(1, -1)
        if self.stack is None:  # a conv model: only TensorFlow could reconstruct it
            box = parse_box(region or "", side)
            original = grey(x[0], side)
            return Pictures(png(outline(original, box) if box else original), None, None, None)
        z = self.scaling(x)
        recon = self.stack.reconstruct(z)
        squared = np.square(z - recon)
        own = locate_regions(squared, side).field(0)
        pixels_recon = self.scaling.undo(recon)
        box = parse_box(region or own, side)
        pictures = [grey(x[0], side), grey(pixels_recon[0], side), heat(squared[0], side)]
        if box is not None:
            pictures = [outline(p, box) for p in pictures]
        return Pictures(png(pictures[0]), png(pictures[1]), png(pictures[2]), own)
