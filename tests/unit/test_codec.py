"""The producer contract: every dtype decodes, every bad entry is rejected with a reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contract.codec import decode_batch, default_max_payload_bytes, encode_image

D = 784
MAX = default_max_payload_bytes(D)


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, D, dtype=np.uint8)


def entry(i: int, **fields: bytes | str) -> tuple[bytes, dict[bytes, bytes]]:
    return (
        f"{i}-0".encode(),
        {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()},
    )


def decode_one(**fields: bytes | str):
    return decode_batch([entry(1, **fields)], D, MAX)


def test_uint8_is_the_default_dtype_and_is_scaled_by_1_over_255() -> None:
    pixels = image()
    batch = decode_one(image=pixels.tobytes())
    assert batch.rejected == []
    np.testing.assert_allclose(batch.images[0], pixels / 255.0, rtol=1e-6)
    assert batch.dtypes == ["uint8"]


def test_float32_little_endian_decodes_exactly() -> None:
    values = np.random.default_rng(1).random(D).astype("<f4")
    batch = decode_one(image=values.tobytes(), dtype="float32")
    np.testing.assert_array_equal(batch.images[0], values)


def test_json_array_decodes() -> None:
    values = np.random.default_rng(2).random(D)
    batch = decode_one(image=json.dumps(values.tolist()), dtype="json")
    np.testing.assert_allclose(batch.images[0], values, rtol=1e-6)


def test_mixed_batch_keeps_entry_order_and_separates_rejects() -> None:
    pixels = [image(i) for i in range(4)]
    entries = [
        entry(1, image=pixels[0].tobytes()),
        entry(2, image=b"short"),
        entry(3, image=(pixels[2] / 255.0).astype("<f4").tobytes(), dtype="float32"),
        entry(4, image=json.dumps((pixels[3] / 255.0).tolist()), dtype="json"),
    ]
    batch = decode_batch(entries, D, MAX)
    assert batch.ids == [b"1-0", b"3-0", b"4-0"]
    assert [r.entry_id for r in batch.rejected] == [b"2-0"]
    for row, source in zip(batch.images, (pixels[0], pixels[2], pixels[3]), strict=True):
        np.testing.assert_allclose(row, source / 255.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("fields", "code", "reason_part"),
    [
        ({"dtype": "uint8"}, "missing_image", "no 'image' field"),
        ({"image": b"\x00" * 783}, "bad_length", "image has 783 bytes, expected 784 for dtype uint8"),
        ({"image": b"\x00" * 100, "dtype": "float32"}, "bad_length", "expected 3136 for dtype float32"),
        ({"image": b"\x00" * D, "dtype": "int16"}, "unknown_dtype", "dtype 'int16' is not supported"),
        ({"image": b"\x00" * D, "dtype": b"\xff\xfe"}, "unknown_dtype", "not supported"),
        ({"image": "[0.1, 0.2", "dtype": "json"}, "bad_json", "not valid JSON"),
        ({"image": '{"a": 1}', "dtype": "json"}, "bad_json", "is an object, expected an array of 784"),
        ({"image": json.dumps([0.5] * 10), "dtype": "json"}, "bad_length", "has 10 values, expected 784"),
        ({"image": json.dumps(["x"] * D), "dtype": "json"}, "not_numeric", "value 0 is a string"),
        ({"image": json.dumps([True] * D), "dtype": "json"}, "not_numeric", "value 0 is a boolean"),
        (
            {"image": "[" + ",".join(["NaN"] + ["0"] * (D - 1)) + "]", "dtype": "json"},
            "non_finite",
            "holds NaN or Infinity",
        ),
        ({"image": json.dumps([2.0] * D), "dtype": "json"}, "out_of_range", "expected values in [0, 1]"),
        ({"image": b"\xff" * (MAX + 1), "dtype": "json"}, "oversize", f"more than the limit of {MAX}"),
        ({"image": image().tobytes(), "id": "x" * 300}, "bad_id", "id has 300 bytes"),
        ({"image": b"\x89PNG\r\n" * 5}, "bad_length", "image has 30 bytes"),
    ],
)
def test_bad_entry_is_rejected_with_a_specific_reason(fields, code: str, reason_part: str) -> None:
    batch = decode_one(**fields)
    assert batch.ids == []
    assert len(batch.rejected) == 1
    rejected = batch.rejected[0]
    assert rejected.code == code
    assert reason_part in rejected.reason


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float32_nan_or_inf_is_rejected(bad: float) -> None:
    values = np.full(D, 0.5, "<f4")
    values[17] = bad
    batch = decode_one(image=values.tobytes(), dtype="float32")
    assert batch.rejected[0].code == "non_finite"
    assert "pixel 17" in batch.rejected[0].reason


def test_float32_out_of_range_is_rejected_and_names_the_range() -> None:
    values = np.full(D, 0.5, "<f4")
    values[3] = 1.5
    batch = decode_one(image=values.tobytes(), dtype="float32")
    assert batch.rejected[0].code == "out_of_range"
    assert "[0.5, 1.5]" in batch.rejected[0].reason


def test_rejected_entry_keeps_all_original_fields() -> None:
    batch = decode_one(image=b"abc", id="p-1", tenant="acme")
    assert batch.rejected[0].fields == {b"image": b"abc", b"id": b"p-1", b"tenant": b"acme"}


def test_extra_fields_do_not_prevent_scoring() -> None:
    batch = decode_one(image=image().tobytes(), tenant="acme", trace="abc")
    assert batch.ids == [b"1-0"] and batch.rejected == []


@pytest.mark.parametrize("dtype", ["uint8", "float32", "json"])
def test_encode_then_decode_round_trips(dtype: str) -> None:
    pixels = image(5)
    fields = {k.encode(): v for k, v in encode_image(pixels, dtype).items()}
    batch = decode_batch([(b"1-0", fields)], D, MAX)
    np.testing.assert_allclose(batch.images[0], pixels / 255.0, atol=1e-6)


def test_encode_uint8_from_floats_rounds_to_nearest_level() -> None:
    fields = encode_image(np.array([0.0, 0.5, 1.0, 0.999]), "uint8")
    assert fields["image"] == bytes([0, 128, 255, 255])


def test_default_payload_cap_fits_a_json_image_with_full_precision_floats() -> None:
    payload = json.dumps([0.12345678901234567] * D).encode()
    assert len(payload) <= MAX


def _uniform_batch(dtype: str, n: int = 6) -> list[tuple[bytes, dict[bytes, bytes]]]:
    rng = np.random.default_rng(len(dtype))
    return [
        (
            f"{i + 1}-0".encode(),
            {k.encode(): v for k, v in encode_image(rng.random(D).astype(np.float32), dtype).items()},
        )
        for i in range(n)
    ]


def _spoil(batch: list, index: int, **fields: bytes) -> list:
    spoiled = [(entry_id, dict(f)) for entry_id, f in batch]
    spoiled[index][1].update({k.encode(): v for k, v in fields.items()})
    return spoiled


@pytest.mark.parametrize(
    "batch",
    [
        _uniform_batch("uint8"),
        _uniform_batch("float32"),
        [(entry_id, {b"image": f[b"image"]}) for entry_id, f in _uniform_batch("uint8")],  # no dtype
        _spoil(_uniform_batch("uint8"), 2, id=b"x" * 300),
        _spoil(_uniform_batch("uint8"), 0, image=b"\x00" * (D - 1)),
        _spoil(_uniform_batch("uint8"), 5, dtype=b"UINT8"),
        _spoil(_uniform_batch("uint8"), 3, dtype=b"float32"),
        _spoil(_uniform_batch("float32"), 1, image=np.full(D, np.nan, "<f4").tobytes()),
        _spoil(_uniform_batch("float32"), 4, image=np.full(D, 1.5, "<f4").tobytes()),
        _spoil(_uniform_batch("float32"), 4, image=np.full(D, -np.inf, "<f4").tobytes()),
    ],
    ids=[
        "uint8",
        "float32",
        "uint8-without-dtype",
        "long-id",
        "short-image",
        "dtype-spelled-differently",
        "mixed",
        "float32-nan",
        "float32-out-of-range",
        "float32-inf",
    ],
)
def test_whole_batch_fast_path_gives_what_entry_by_entry_decoding_gives(batch: list) -> None:
    from contract.codec import _decode_any

    fast, slow = decode_batch(batch, D, MAX), _decode_any(batch, D, MAX, 1 / 255)
    assert fast.ids == slow.ids and fast.dtypes == slow.dtypes
    np.testing.assert_array_equal(fast.images, slow.images)
    assert fast.images.dtype == np.float32 and fast.images.flags.writeable
    assert [(r.entry_id, r.code, r.reason) for r in fast.rejected] == [
        (r.entry_id, r.code, r.reason) for r in slow.rejected
    ]


def test_an_all_uint8_batch_keeps_its_raw_pixels_and_scales_them_on_first_use() -> None:
    batch = decode_batch(_uniform_batch("uint8"), D, MAX, 1 / 255)
    assert batch.pixels.dtype == np.uint8 and batch.scale == 1 / 255  # what a scoring process gets
    np.testing.assert_array_equal(batch.images, batch.pixels * np.float32(1 / 255))
    assert batch.images is batch.images  # scaled once
    floats = decode_batch(_uniform_batch("float32"), D, MAX)
    assert floats.scale is None and floats.images is floats.pixels


def test_the_fast_path_takes_clean_uniform_batches_and_leaves_the_rest() -> None:
    from contract.codec import _decode_uniform

    for dtype in ("uint8", "float32"):
        assert _decode_uniform(_uniform_batch(dtype), D, MAX, 1 / 255) is not None
    assert _decode_uniform(_spoil(_uniform_batch("uint8"), 3, dtype=b"float32"), D, MAX, 1 / 255) is None
    bad = _spoil(_uniform_batch("float32"), 1, image=np.full(D, np.nan, "<f4").tobytes())
    assert _decode_uniform(bad, D, MAX, 1 / 255) is None
    assert _decode_uniform(_uniform_batch("json"), D, MAX, 1 / 255) is None


# -- hostile input: every way an entry can be wrong is that entry's dead letter, with a reason --------
ZEROS = ",".join(["0"] * (D - 1))
HOSTILE_JSON = {
    "deep-nesting": ("[" * 5000, "bad_json", "nested"),
    "deep-balanced-nesting": ("[" * 2000 + "0" + "]" * 2000, "bad_json", "nested"),
    "4400-digit-integer": ("[" + ZEROS + "," + "9" * 4400 + "]", "bad_json", "not valid JSON"),
    "1e999": ("[" + ZEROS + ",1e999]", "bad_json", "not valid JSON"),
    "negative-huge": ("[" + ZEROS + ",-" + "9" * 30 + "]", "bad_json", "not valid JSON"),
    "infinity-literal": ("[" + ZEROS + ",Infinity]", "non_finite", "NaN or Infinity"),
    "object": ('{"image": [0]}', "bad_json", "is an object"),
    "string": ('"0,0,0"', "bad_json", "is a string"),
    "number": ("0.5", "bad_json", "not an array"),
    "nested-array": ("[[" + ZEROS + ",0]]", "bad_json", "nested"),
    "object-in-array": ("[" + ZEROS + ",{}]", "bad_json", "nested"),
    "null-in-array": ("[" + ZEROS + ",null]", "not_numeric", f"value {D - 1} is null"),
    "trailing-garbage": ("[" + ZEROS + ",0] x", "bad_json", "not valid JSON"),
    "trailing-comma": ("[" + ZEROS + ",0,]", "bad_json", "not valid JSON"),
    "empty": ("", "bad_json", "not an array"),
    "empty-array": ("[]", "bad_length", "has 0 values"),
}


@pytest.mark.parametrize(
    ("payload", "code", "reason_part"), list(HOSTILE_JSON.values()), ids=list(HOSTILE_JSON)
)
def test_hostile_json_image_is_rejected_alone_with_a_reason(
    payload: str, code: str, reason_part: str
) -> None:
    good = json.dumps([0.25] * D)
    batch = decode_batch(
        [
            entry(1, image=good, dtype="json"),
            entry(2, image=payload, dtype="json"),
            entry(3, image=good, dtype="json"),
        ],
        D,
        MAX,
    )
    assert batch.ids == [b"1-0", b"3-0"]
    [rejected] = batch.rejected
    assert (rejected.entry_id, rejected.code) == (b"2-0", code), rejected.reason
    assert reason_part in rejected.reason


def test_json_image_that_is_not_utf8_is_rejected() -> None:
    batch = decode_one(image=b"[\xff\xfe" + b",0" * (D - 1) + b"]", dtype="json")
    assert batch.rejected[0].code == "bad_json"
    assert "not UTF-8" in batch.rejected[0].reason


def test_json_image_accepts_every_number_form_json_allows() -> None:
    values = ["0", "1", "0.5", "5e-1", "5E-1", "1.25e-1", "-0", "-0.0", "1.0"] + ["0"] * (D - 9)
    batch = decode_one(image=" [ " + " , ".join(values) + " ]\n", dtype="json")
    assert batch.rejected == []
    np.testing.assert_allclose(batch.images[0][:9], [0, 1, 0.5, 0.5, 0.5, 0.125, 0, 0, 1])


def test_an_unexpected_error_inside_one_entry_becomes_its_decode_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import contract.codec as codec

    real = codec._decode_json

    def flaky(payload: bytes, dim: int) -> np.ndarray:
        if payload.startswith(b"[0.5"):
            raise MemoryError("simulated: the parser ran out of memory")
        return real(payload, dim)

    monkeypatch.setattr(codec, "_decode_json", flaky)
    good, bad = json.dumps([0.25] * D), json.dumps([0.5] * D)
    batch = decode_batch([entry(1, image=good, dtype="json"), entry(2, image=bad, dtype="json")], D, MAX)
    assert batch.ids == [b"1-0"]
    assert batch.rejected[0].code == "decode_error"
    assert "MemoryError: simulated" in batch.rejected[0].reason


def test_a_failure_of_the_batch_path_falls_back_to_entry_by_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    import contract.codec as codec

    real = codec._decode_any

    def fails_on_batches(entries, dim, max_payload, scale):  # type: ignore[no-untyped-def]
        if len(entries) > 1:
            raise IndexError("simulated: a bug of the batch path")
        if entries[0][0] == b"2-0":
            raise KeyError("simulated: this entry's own failure")
        return real(entries, dim, max_payload, scale)

    monkeypatch.setattr(codec, "_decode_any", fails_on_batches)
    entries = [
        entry(i, image=image(i).tobytes(), dtype="uint8", id="x" * 300 if i == 3 else "p")
        for i in (1, 2, 3, 4)
    ]
    batch = decode_batch(entries, D, MAX)
    assert batch.ids == [b"1-0", b"4-0"]
    assert {(r.entry_id, r.code) for r in batch.rejected} == {(b"2-0", "decode_error"), (b"3-0", "bad_id")}
    np.testing.assert_allclose(batch.images[1], image(4) / 255.0, rtol=1e-6)
