"""Whatever producers send, the worker never crashes and every entry is accounted for exactly once."""

from __future__ import annotations

import json

import fakeredis
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import D, build_runner

field_names = st.sampled_from([b"image", b"dtype", b"id", b"extra", b"reason", b"\xff\x00"])
valid_images = st.one_of(
    st.binary(min_size=D, max_size=D).map(lambda b: {b"image": b}),
    st.lists(st.floats(0, 1, width=32), min_size=D, max_size=D).map(
        lambda v: {b"image": np.asarray(v, "<f4").tobytes(), b"dtype": b"float32"}
    ),
    st.lists(st.floats(0, 1), min_size=D, max_size=D).map(
        lambda v: {b"image": json.dumps(v).encode(), b"dtype": b"json"}
    ),
)
garbage = st.dictionaries(
    field_names,
    st.one_of(
        st.binary(max_size=4 * D + 8),
        st.sampled_from([b"uint8", b"float32", b"json", b"JSON", b"", b"NaN", b"[", b"[1e999]"]),
        st.lists(st.one_of(st.floats(allow_nan=True), st.text(max_size=3), st.none()), max_size=D + 2).map(
            lambda v: json.dumps(v).encode()
        ),
    ),
    min_size=1,
    max_size=5,
)
entries = st.lists(st.one_of(valid_images, garbage), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=entries)
def test_random_entries_never_crash_and_each_ends_scored_or_dead_lettered(batch) -> None:
    r = fakeredis.FakeRedis()
    runner = build_runner(r, consumer="p", scores_stream="scores", batch_size=16, output_maxlen=0)
    ids = [r.xadd("images", fields) for fields in batch]
    runner.drain()
    scored = [f[b"source_id"] for _, f in r.xrange("scores")]
    dead = [f[b"source_id"] for _, f in r.xrange("images:dead-letter")]
    assert sorted(scored + dead) == sorted(ids)
    assert all(f[b"reason"] for _, f in r.xrange("images:dead-letter"))
    assert int(r.xpending("images", "anomaly-scorer")["pending"]) == 0


json_like = st.recursive(
    st.one_of(
        st.text("0123456789", min_size=1, max_size=5000).map(lambda digits: "-" + digits),  # huge integers
        st.integers().map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(["true", "null", '"x"', "NaN", "Infinity", "1e999", "-0", "0"]),
    ),
    lambda inner: (
        st.lists(inner, max_size=6).map(lambda v: "[" + ",".join(v) + "]")
        | st.lists(inner, max_size=3).map(lambda v: "{" + ",".join(f'"k":{x}' for x in v) + "}")
    ),
    max_leaves=30,
).map(str.encode)
any_field_map = st.dictionaries(
    st.one_of(st.sampled_from([b"image", b"dtype", b"id"]), st.binary(max_size=8)),
    st.one_of(
        st.binary(max_size=4 * D + 8),
        json_like,
        st.sampled_from([b"uint8", b"float32", b"json", b"JSON ", b"\xff", b"[" * 3000]),
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.lists(
        st.one_of(valid_images, any_field_map, any_field_map.map(lambda f: {**f, b"dtype": b"json"})),
        min_size=1,
        max_size=12,
    )
)
def test_decode_returns_an_image_or_a_reason_for_every_entry_and_never_raises(batch) -> None:
    from contract.codec import decode_batch, default_max_payload_bytes

    entries = [(f"{i + 1}-0".encode(), fields) for i, fields in enumerate(batch)]
    decoded = decode_batch(entries, D, default_max_payload_bytes(D))
    assert len(decoded.ids) + len(decoded.rejected) == len(entries)
    assert sorted(decoded.ids + [r.entry_id for r in decoded.rejected]) == sorted(e[0] for e in entries)
    assert decoded.images.shape == (len(decoded.ids), D)
    assert np.isfinite(decoded.images).all() and (decoded.images >= 0).all() and (decoded.images <= 1).all()
    for rejected in decoded.rejected:
        assert rejected.code and rejected.reason
