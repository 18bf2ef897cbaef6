"""Autoencoder architectures by name. Each returns a keras.Model with `encoder`/`decoder` sub-models."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from detector.components.base import ForwardPass
from detector.engines.keras_engine import encoder_layers_model
from detector.score import Score, mse_score


def _dense(input_dim: int, hidden: list[int], code: int, name: str, linear_output: bool) -> Any:
    import keras
    from keras import layers

    enc_in = keras.Input((input_dim,), name="image")
    h = enc_in
    for i, units in enumerate(hidden):
        h = layers.Dense(units, activation="relu", name=f"enc_{i}")(h)
    code_out = layers.Dense(code, activation="relu", name="code")(h)
    encoder = keras.Model(enc_in, code_out, name="encoder")

    dec_in = keras.Input((code,), name="code_in")
    h = dec_in
    for i, units in enumerate(reversed(hidden)):
        h = layers.Dense(units, activation="relu", name=f"dec_{i}")(h)
    out = layers.Dense(input_dim, activation=None if linear_output else "sigmoid", name="reconstruction")(h)
    decoder = keras.Model(dec_in, out, name="decoder")

    inputs = keras.Input((input_dim,), name="input")
    return keras.Model(inputs, decoder(encoder(inputs)), name=name)


def build_dense_32(input_dim: int, linear_output: bool = False) -> Any:
    """784-32-784: the first reference notebooks' model."""
    return _dense(input_dim, [], 32, "dense-32", linear_output)


def build_dense_64_16(input_dim: int, linear_output: bool = False) -> Any:
    """784-64-16-64-784: the default."""
    return _dense(input_dim, [64], 16, "dense-64-16", linear_output)


def build_dense_512_128_32(input_dim: int, linear_output: bool = False) -> Any:
    """784-512-128-32-128-512-784: the best of the one-class comparison (docs/detection.md)."""
    return _dense(input_dim, [512, 128], 32, "dense-512-128-32", linear_output)


def build_conv(input_dim: int, linear_output: bool = False) -> Any:
    """A small convolutional autoencoder for square single-channel images (28x28)."""
    import keras
    from keras import layers

    side = math.isqrt(input_dim)
    if side * side != input_dim or side % 4 != 0:
        raise ValueError(f"conv needs square images with a side divisible by 4, found D={input_dim}")
    enc_in = keras.Input((input_dim,), name="image")
    h = layers.Reshape((side, side, 1))(enc_in)
    h = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="enc_conv0")(h)
    h = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu", name="enc_conv1")(h)
    h = layers.Flatten()(h)
    code_out = layers.Dense(32, activation="relu", name="code")(h)
    encoder = keras.Model(enc_in, code_out, name="encoder")

    q = side // 4
    dec_in = keras.Input((32,), name="code_in")
    h = layers.Dense(q * q * 64, activation="relu")(dec_in)
    h = layers.Reshape((q, q, 64))(h)
    h = layers.Conv2DTranspose(64, 3, strides=2, padding="same", activation="relu")(h)
    h = layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu")(h)
    h = layers.Conv2D(1, 3, padding="same", activation=None if linear_output else "sigmoid")(h)
    out = layers.Reshape((input_dim,), name="reconstruction")(h)
    decoder = keras.Model(dec_in, out, name="decoder")

    inputs = keras.Input((input_dim,), name="input")
    return keras.Model(inputs, decoder(encoder(inputs)), name="conv")


Architecture = Literal["conv", "dense-32", "dense-512-128-32", "dense-64-16"]
ARCHITECTURES: dict[Architecture, Callable[..., Any]] = {
    "dense-32": build_dense_32,
    "dense-64-16": build_dense_64_16,
    "dense-512-128-32": build_dense_512_128_32,
    "conv": build_conv,
}
DEFAULT_ARCHITECTURE: Architecture = "dense-64-16"
# Chains of Dense layers: exported to numpy, and what the components that read the encoder's
# first layer need (Component.needs_dense).
DENSE_ARCHITECTURES: tuple[Architecture, ...] = ("dense-32", "dense-64-16", "dense-512-128-32")


def build_model(name: str, input_dim: int, linear_output: bool = False) -> Any:
    """Build an architecture by name."""
    try:
        builder = ARCHITECTURES[name]  # type: ignore[index]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}"
        ) from None
    return builder(input_dim, linear_output=linear_output)


def forward_pass(
    model: Any, x: np.ndarray, encoder_layers: Any = None, batch_size: int = 1024
) -> ForwardPass:
    """The Keras autoencoder's forward pass of `x` (model space); with `encoder_layers` (the
    model's `encoder_layers_model`, built once per model: each new one retraces), its encoder
    layers' outputs too."""
    recon = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
    if encoder_layers is None:
        return ForwardPass(x, recon)
    layers = encoder_layers.predict(x, batch_size=batch_size, verbose=0)
    outputs = layers if isinstance(layers, list | tuple) else [layers]
    return ForwardPass(x, recon, tuple(np.asarray(o) for o in outputs))


def forward_of(model: Any) -> Callable[[np.ndarray], ForwardPass]:
    """The Keras autoencoder's forward pass of model-space images, every encoder layer included
    (what components fit on: `NormalData.forward`)."""
    encoder_layers = encoder_layers_model(model)  # built once: each new one retraces
    return lambda x: forward_pass(model, x, encoder_layers)


def reconstruction_errors(
    model: Any, x: np.ndarray, score: Score | None = None, batch_size: int = 1024
) -> np.ndarray:
    """Per-row score (MSE unless `score` says otherwise) of `x`, already in model space."""
    score = score or mse_score()
    layers = encoder_layers_model(model) if score.needs_encoder else None
    return score(forward_pass(model, x, layers, batch_size))
