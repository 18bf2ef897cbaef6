"""Every architecture builds, survives save/load in safe mode, and exposes its encoder and decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.models import ARCHITECTURES, build_model


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_round_trips_through_safe_mode_load_with_its_encoder(name: str, tmp_path: Path) -> None:
    import keras

    model = build_model(name, 784)
    x = np.random.default_rng(0).random((4, 784), dtype=np.float32)
    before = model.predict(x, verbose=0)
    assert before.shape == (4, 784)
    assert ((before >= 0) & (before <= 1)).all(), "sigmoid output must stay in the pixel range"

    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), before, rtol=1e-5, atol=1e-6)

    encoder = loaded.get_layer("encoder")
    decoder = loaded.get_layer("decoder")
    codes = encoder.predict(x, verbose=0)
    assert codes.shape == (4, int(encoder.output.shape[-1]))
    np.testing.assert_allclose(decoder.predict(codes, verbose=0), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_standardized_input_gets_an_unbounded_output(name: str) -> None:
    """z-scores are negative too: a sigmoid output could never reconstruct them."""
    model = build_model(name, 784, linear_output=True)
    x = np.random.default_rng(1).normal(size=(8, 784)).astype(np.float32)
    assert (model.predict(x, verbose=0) < 0).any()


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet'; expected one of dense-32"):
        build_model("resnet", 784)


@pytest.mark.parametrize("name", ["conv"])
def test_conv_architectures_refuse_non_square_input(name: str) -> None:
    with pytest.raises(ValueError, match=r"needs square images .* found D=101"):
        build_model(name, 101)
