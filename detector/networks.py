"""The numpy networks: a dense autoencoder (`DenseStack`) and the transformation classifier.

The dense autoencoder as plain numpy arrays is the worker's TensorFlow-free forward pass.

Every dense architecture (dense-32, dense-64-16, dense-512-128-32) is a chain of Dense layers.
The trainer writes that chain to `dense_stack.npz` next to `model.keras`, so a worker scores it
with a few matrix products: no `import tensorflow` (about 600 MB of memory and seconds of start
time), and no per-call framework overhead, which dominates at the small batches a live stream has.

File format (`numpy.savez`, loaded with allow_pickle=False):
  kernel_0 .. kernel_{n-1}   float32 (in, out) matrices, in order from input to reconstruction
  bias_0 .. bias_{n-1}       float32 (out,) vectors
  activations                str (n,): each of linear, relu, sigmoid, tanh
  code_layer                 int (): index of the layer whose output is the latent code
The trainer writes it only after checking that it reproduces the Keras model's output.

The chain itself (checks, forward pass, .npz format: `check_chain`, `forward`, `chain_to_bytes`,
`read_npz`, `chain_from_arrays`) is shared with the transformation classifier
(`TransformClassifier`), whose file has the same arrays without `code_layer`.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

from detector.errors import ArtifactError

DENSE_STACK_FILE = "dense_stack.npz"
Activation = Literal["linear", "relu", "sigmoid", "tanh"]
ACTIVATIONS: tuple[Activation, ...] = ("linear", "relu", "sigmoid", "tanh")


def activate(h: np.ndarray, name: str) -> None:
    """Apply an activation in place (no temporaries at batch size x layer width)."""
    if name == "relu":
        np.maximum(h, 0.0, out=h)
    elif name == "sigmoid":
        # 1 / (1 + exp(-h)): numpy's float32 exp is vectorised for AVX2 and AVX-512 alike, its tanh
        # not for AVX2 (0.63 vs 0.93 ms on a 256 x 784 batch, AMD EPYC), and 0.5 * tanh(h / 2) + 0.5
        # loses the relative precision of outputs near 0. Below h = -88, exp(-h) overflows to inf
        # and the output is exactly 0, as it should be.
        np.negative(h, out=h)
        with np.errstate(over="ignore"):
            np.exp(h, out=h)
        h += 1.0
        np.reciprocal(h, out=h)
    elif name == "tanh":
        np.tanh(h, out=h)


@dataclass(frozen=True)
class DenseStack:
    """Kernels, biases and activations of a chain of Dense layers (input -> reconstruction)."""

    kernels: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    activations: tuple[Activation, ...]
    code_layer: int

    def __post_init__(self) -> None:
        check_chain(self.kernels, self.biases, self.activations)
        if self.kernels[-1].shape[1] != self.kernels[0].shape[0]:
            raise ValueError(
                f"an autoencoder ends where it starts: input {self.kernels[0].shape[0]} features, "
                f"output {self.kernels[-1].shape[1]}"
            )
        n = len(self.kernels)
        if not 0 <= self.code_layer < n:
            raise ValueError(f"code_layer {self.code_layer} is not a layer index (0..{n - 1})")

    @property
    def input_dim(self) -> int:
        """Features in (and out)."""
        return int(self.kernels[0].shape[0])

    @property
    def latent_dim(self) -> int:
        """Width of the code layer."""
        return int(self.kernels[self.code_layer].shape[1])

    def _through(self, x: np.ndarray, layers: range) -> np.ndarray:
        return forward(x, self.kernels, self.biases, self.activations, layers)

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """The autoencoder's output for a (n, D) float32 batch."""
        return self._through(x, range(len(self.kernels)))

    def encode(self, x: np.ndarray) -> np.ndarray:
        """The latent code of a (n, D) float32 batch."""
        return self._through(x, range(self.code_layer + 1))

    def reconstruct_keeping_encoder(self, x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """The reconstruction and every encoder layer's output (code last), in one pass."""
        encoder: list[np.ndarray] = []
        h = x
        for i in range(self.code_layer + 1):
            h = forward(h, self.kernels, self.biases, self.activations, range(i, i + 1))
            encoder.append(h)  # forward returns a new array: later layers never write this one
        recon = self._through(h, range(self.code_layer + 1, len(self.kernels)))
        return recon, tuple(encoder)

    def to_bytes(self) -> bytes:
        """The `dense_stack.npz` file's content."""
        extra = {"code_layer": np.asarray(self.code_layer, dtype=np.int64)}
        return chain_to_bytes(self.kernels, self.biases, self.activations, extra)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> DenseStack:
        """Parse a `dense_stack.npz`; ArtifactError names the file and what is wrong."""
        arrays = read_npz(data, where)
        try:
            code_layer = int(arrays.pop("code_layer"))
        except KeyError as exc:
            raise ArtifactError(f"{where} lacks the array {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"{where} has an array of the wrong kind: {exc}") from exc
        kernels, biases, activations = chain_from_arrays(arrays, where)
        try:
            return cls(kernels, biases, activations, code_layer)
        except ValueError as exc:
            raise ArtifactError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class TransformClassifier:
    """A chain of Dense layers to one logit per transformation, in numpy: from the image (the
    `transforms` classifier) or from an encoder layer (the `orientation` head)."""

    kernels: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    activations: tuple[Activation, ...]

    def __post_init__(self) -> None:
        check_chain(self.kernels, self.biases, self.activations)

    @property
    def input_dim(self) -> int:
        """Values in: pixels, or the width of the layer it reads."""
        return int(self.kernels[0].shape[0])

    @property
    def classes(self) -> int:
        """Logits out: the number of transformations it tells apart."""
        return int(self.kernels[-1].shape[1])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(n, classes) logits of a (n, D) float32 batch."""
        return forward(np.asarray(x, np.float32), self.kernels, self.biases, self.activations)

    def to_bytes(self) -> bytes:
        """The `transform_classifier.npz` file's content."""
        return chain_to_bytes(self.kernels, self.biases, self.activations)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> TransformClassifier:
        """Parse a `transform_classifier.npz`; ArtifactError names the file and what is wrong."""
        kernels, biases, activations = chain_from_arrays(read_npz(data, where), where)
        try:
            return cls(kernels, biases, activations)
        except ValueError as exc:
            raise ArtifactError(f"{where}: {exc}") from exc


# A chain of Dense layers, shared by the autoencoder (DenseStack) and the transformation
# classifier (detector.components.transforms): its checks, its forward pass and its .npz format.


def check_chain(
    kernels: tuple[np.ndarray, ...], biases: tuple[np.ndarray, ...], activations: tuple[str, ...]
) -> None:
    """ValueError unless the layers fit together and every activation is supported."""
    n = len(kernels)
    if n == 0 or len(biases) != n or len(activations) != n:
        raise ValueError(
            f"a chain of Dense layers needs as many kernels, biases and activations, found "
            f"{len(kernels)}, {len(biases)} and {len(activations)}"
        )
    for i, (kernel, bias) in enumerate(zip(kernels, biases, strict=True)):
        if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
            raise ValueError(f"layer {i}: kernel {kernel.shape} and bias {bias.shape} do not fit")
        if i and kernel.shape[0] != kernels[i - 1].shape[1]:
            raise ValueError(
                f"layer {i} takes {kernel.shape[0]} inputs, layer {i - 1} gives {kernels[i - 1].shape[1]}"
            )
    unknown = [a for a in activations if a not in ACTIVATIONS]
    if unknown:
        raise ValueError(f"activations {unknown} are not supported; expected {', '.join(ACTIVATIONS)}")


def forward(
    x: np.ndarray,
    kernels: tuple[np.ndarray, ...],
    biases: tuple[np.ndarray, ...],
    activations: tuple[Activation, ...],
    layers: range | None = None,
) -> np.ndarray:
    """Run `x` through `layers` of the chain (all by default)."""
    h = x
    for i in range(len(kernels)) if layers is None else layers:
        h = h @ kernels[i]  # a new array: the caller's x is never written
        h += biases[i]
        activate(h, activations[i])
    return h


def chain_to_bytes(
    kernels: tuple[np.ndarray, ...],
    biases: tuple[np.ndarray, ...],
    activations: tuple[Activation, ...],
    extra: dict[str, np.ndarray] | None = None,
) -> bytes:
    """An .npz of `kernel_i`, `bias_i`, `activations` and any `extra` arrays."""
    arrays: dict[str, np.ndarray] = dict(extra or {})
    for i, (kernel, bias) in enumerate(zip(kernels, biases, strict=True)):
        arrays[f"kernel_{i}"] = np.asarray(kernel, np.float32)
        arrays[f"bias_{i}"] = np.asarray(bias, np.float32)
    arrays["activations"] = np.asarray(activations, dtype=str)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def read_npz(data: bytes, where: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file (no pickles); ArtifactError names the file when unreadable."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{where} is not a readable .npz file: {exc}") from exc


def chain_from_arrays(
    arrays: dict[str, np.ndarray], where: str
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], tuple[Activation, ...]]:
    """Take the chain's arrays out of `arrays`; ArtifactError on a missing, odd or extra array."""
    try:
        activations = tuple(str(a) for a in arrays.pop("activations").ravel())
        n = len(activations)
        kernels = tuple(np.ascontiguousarray(arrays.pop(f"kernel_{i}"), np.float32) for i in range(n))
        biases = tuple(np.ascontiguousarray(arrays.pop(f"bias_{i}"), np.float32) for i in range(n))
    except KeyError as exc:
        raise ArtifactError(f"{where} lacks the array {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{where} has an array of the wrong kind: {exc}") from exc
    if arrays:
        raise ArtifactError(f"{where} has unexpected arrays {sorted(arrays)}")
    # NaN or infinite weights load fine and then score every image NaN, which is never flagged.
    bad = [f"{kind}_{i}" for kind, group in (("kernel", kernels), ("bias", biases))
           for i, a in enumerate(group) if not np.isfinite(a).all()]  # fmt: skip
    if bad:
        raise ArtifactError(f"{where} has non-finite weights in {', '.join(bad)}; expected finite floats")
    return kernels, biases, cast(tuple[Activation, ...], activations)
