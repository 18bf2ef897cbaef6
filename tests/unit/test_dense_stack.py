"""The dense stack: numpy's forward pass of a dense autoencoder, its file, and the trainer's export."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest

from detector.errors import ArtifactError
from detector.networks import DenseStack, activate
from tests.conftest import mnist_sample


def random_stack(dims: tuple[int, ...] = (6, 4, 2, 4, 6), seed: int = 0) -> DenseStack:
    rng = np.random.default_rng(seed)
    kernels = tuple(rng.standard_normal((a, b)).astype(np.float32) for a, b in itertools.pairwise(dims))
    biases = tuple(rng.standard_normal(b).astype(np.float32) for b in dims[1:])
    activations = ("relu",) * (len(kernels) - 1) + ("sigmoid",)
    return DenseStack(kernels, biases, activations, code_layer=len(kernels) // 2 - 1)  # type: ignore[arg-type]


def test_forward_pass_is_the_layer_formula() -> None:
    stack = random_stack()
    x = np.random.default_rng(1).random((5, 6), dtype=np.float32)
    h = x
    for kernel, bias, activation in zip(stack.kernels, stack.biases, stack.activations, strict=True):
        h = h @ kernel + bias
        h = np.maximum(h, 0) if activation == "relu" else 1 / (1 + np.exp(-h))
    np.testing.assert_allclose(stack.reconstruct(x), h, rtol=1e-6)
    np.testing.assert_allclose(
        stack.encode(x),
        np.maximum(
            np.maximum(x @ stack.kernels[0] + stack.biases[0], 0) @ stack.kernels[1] + stack.biases[1], 0
        ),
        rtol=1e-6,
    )
    assert stack.input_dim == 6 and stack.latent_dim == 2


def test_the_input_batch_is_never_written() -> None:
    x = np.random.default_rng(2).random((3, 6), dtype=np.float32)
    before = x.copy()
    random_stack().reconstruct(x)
    np.testing.assert_array_equal(x, before)


def test_sigmoid_saturates_without_warnings_or_nan() -> None:
    stack = random_stack()
    x = np.full((2, 6), 1e4, np.float32)
    out = stack.reconstruct(x)
    assert np.isfinite(out).all() and ((out >= 0) & (out <= 1)).all()


def test_sigmoid_keeps_its_relative_precision_from_saturation_to_saturation() -> None:
    z = np.array([-1e4, -100.0, -88.8, -40.0, -20.0, -3.0, 0.0, 3.0, 20.0, 100.0, 1e4], np.float32)
    h = z.copy()
    activate(h, "sigmoid")
    with np.errstate(over="ignore"):
        expected = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    # relative to the exact value wherever float32 has normal numbers (below them: 0 is right)
    np.testing.assert_allclose(h, expected, rtol=1e-6, atol=float(np.finfo(np.float32).tiny))


def test_file_round_trip_keeps_every_array() -> None:
    stack = random_stack()
    again = DenseStack.from_bytes(stack.to_bytes(), "dense_stack.npz")
    assert again.activations == stack.activations and again.code_layer == stack.code_layer
    for a, b in zip(again.kernels + again.biases, stack.kernels + stack.biases, strict=True):
        np.testing.assert_array_equal(a, b)


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def test_broken_files_are_refused_with_the_reason() -> None:
    good = random_stack()
    arrays = dict(np.load(io.BytesIO(good.to_bytes())))
    with pytest.raises(ArtifactError, match=r"x\.npz is not a readable \.npz file"):
        DenseStack.from_bytes(b"not a zip", "x.npz")
    with pytest.raises(ArtifactError, match=r"x\.npz lacks the array 'bias_2'"):
        DenseStack.from_bytes(_npz(**{k: v for k, v in arrays.items() if k != "bias_2"}), "x.npz")
    with pytest.raises(ArtifactError, match=r"layer 2 takes 2 inputs, layer 1 gives 3"):
        DenseStack.from_bytes(
            _npz(**{**arrays, "kernel_1": np.zeros((4, 3), np.float32), "bias_1": np.zeros(3, np.float32)}),
            "x.npz",
        )
    with pytest.raises(ArtifactError, match=r"activations \['swish'\] are not supported"):
        DenseStack.from_bytes(
            _npz(**{**arrays, "activations": np.array(["relu", "swish", "relu", "sigmoid"])}), "x.npz"
        )
    with pytest.raises(ArtifactError, match="unexpected arrays"):
        DenseStack.from_bytes(_npz(**arrays, extra=np.zeros(1)), "x.npz")
    with pytest.raises(ArtifactError, match="code_layer 9 is not a layer index"):
        DenseStack.from_bytes(_npz(**{**arrays, "code_layer": np.asarray(9)}), "x.npz")


def test_every_dense_architecture_exports_and_matches_keras() -> None:
    from trainer.export import verified_dense_stack
    from trainer.models import ARCHITECTURES, build_model

    x, _ = mnist_sample(64, seed=3)
    for name in ARCHITECTURES:
        if not name.startswith("dense"):
            continue
        model = build_model(name, 784)
        stack = verified_dense_stack(model, x)
        assert stack is not None, name
        np.testing.assert_allclose(stack.reconstruct(x), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
        assert stack.latent_dim == model.get_layer("encoder").output.shape[-1]
        np.testing.assert_allclose(
            stack.encode(x), model.get_layer("encoder").predict(x, verbose=0), rtol=1e-4, atol=1e-5
        )


def test_a_conv_model_is_not_exported_and_says_why() -> None:
    from trainer.export import dense_stack_of
    from trainer.models import build_model

    stack, why = dense_stack_of(build_model("conv", 784))
    assert stack is None and "not Dense" in why


def test_a_model_that_is_not_a_plain_chain_is_not_exported() -> None:
    import keras

    from trainer.export import dense_stack_of, verified_dense_stack

    inputs = keras.Input((6,))
    shared = keras.layers.Dense(6, activation="relu")
    encoder = keras.Model(inputs, shared(shared(inputs)), name="encoder")  # one layer, applied twice
    outer = keras.Input((6,))
    model = keras.Model(outer, keras.layers.Dense(6, activation="sigmoid")(encoder(outer)))
    assert dense_stack_of(model)[0] is not None  # the layer list alone looks like a chain...
    x = np.random.default_rng(0).random((8, 6), dtype=np.float32)
    assert verified_dense_stack(model, x) is None  # ...the parity check catches it

    residual = keras.Model(outer, keras.layers.Add()([encoder(outer), outer]))
    assert dense_stack_of(residual)[1].endswith("is a Add, not Dense")
    no_encoder = keras.Model(outer, keras.layers.Dense(6, activation="sigmoid")(outer))
    assert dense_stack_of(no_encoder) == (None, "the model has no 'encoder' sub-model")
