"""Export a trained Keras autoencoder as a `detector.networks.DenseStack` when it is one.

A model qualifies when, nested sub-models flattened, it is nothing but Dense layers with
linear/relu/sigmoid/tanh activations. The export is kept only if it reproduces the Keras
model's output on real rows (`verified_dense_stack`), so a graph that is not a plain chain
(a skip connection, say) is never exported wrongly: such a model is served by TensorFlow.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from detector.networks import ACTIVATIONS, Activation, DenseStack

log = logging.getLogger(__name__)

# Largest |numpy - keras| difference accepted, relative to the output's scale (float32 rounding).
PARITY_TOLERANCE = 1e-4


def _leaf_layers(layer: Any) -> list[Any]:
    import keras

    if isinstance(layer, keras.layers.InputLayer):
        return []
    if isinstance(layer, keras.Model):
        return [leaf for inner in layer.layers for leaf in _leaf_layers(inner)]
    return [layer]


DenseChain = tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], tuple[Activation, ...]]


def dense_chain_of(model: Any) -> tuple[DenseChain | None, str]:
    """Kernels, biases and activations of a model made only of Dense layers (nested sub-models
    flattened), or None and the reason it is not one."""
    import keras

    kernels, biases, activations = [], [], []
    for layer in _leaf_layers(model):
        if not isinstance(layer, keras.layers.Dense):
            return None, f"layer {layer.name!r} is a {type(layer).__name__}, not Dense"
        activation = keras.activations.serialize(layer.activation)
        if activation not in ACTIVATIONS:
            return None, f"layer {layer.name!r} has activation {activation!r}"
        weights = layer.get_weights()
        kernel = np.asarray(weights[0], np.float32)
        bias = np.asarray(weights[1], np.float32) if layer.use_bias else np.zeros(kernel.shape[1], np.float32)
        kernels.append(kernel)
        biases.append(bias)
        activations.append(activation)
    return (tuple(kernels), tuple(biases), tuple(activations)), ""


def dense_stack_of(model: Any) -> tuple[DenseStack | None, str]:
    """The model as a DenseStack, or None and the reason it is not one."""
    chain, why = dense_chain_of(model)
    if chain is None:
        return None, why
    kernels, biases, activations = chain
    try:
        encoder = model.get_layer("encoder")
    except ValueError:
        return None, "the model has no 'encoder' sub-model"
    code_layer = len(_leaf_layers(encoder)) - 1
    try:
        return DenseStack(kernels, biases, activations, code_layer), ""
    except ValueError as exc:
        return None, str(exc)


def verified_dense_stack(model: Any, sample: np.ndarray) -> DenseStack | None:
    """dense_stack_of(model) if it reproduces model.predict on `sample`, else None (logged)."""
    stack, why = dense_stack_of(model)
    if stack is None:
        log.info("no dense stack exported (the worker will need TensorFlow): %s", why)
        return None
    x = np.asarray(sample, np.float32)
    expected = model.predict(x, batch_size=1024, verbose=0)
    found = stack.reconstruct(x)
    scale = max(1.0, float(np.max(np.abs(expected))))
    difference = float(np.max(np.abs(found - expected))) if x.size else 0.0
    if difference > PARITY_TOLERANCE * scale:
        log.warning(
            "dense stack differs from the Keras model by %.3g (tolerance %.3g); not exported",
            difference,
            PARITY_TOLERANCE * scale,
        )
        return None
    return stack
