"""Stream entry fields <-> image arrays. Every rejection carries a code and a readable reason.

Input entry fields (the producer contract):
  image  the D pixel values, row-major, encoded as `dtype` says
  dtype  uint8 (default: D raw bytes 0-255, scaled by 1/255), float32 (4*D bytes little-endian,
         values in [0,1]) or json (a JSON array of D numbers in [0,1])
  id     optional producer id, echoed back in the output entry
Any other field is kept (and copied to the dead-letter stream when the entry is rejected).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import simdjson

from detector.errors import InvalidMessage

DTYPES = ("uint8", "float32", "json")
MAX_ID_BYTES = 256
Entry = tuple[bytes, Mapping[bytes, bytes]]


def default_max_payload_bytes(input_dim: int) -> int:
    """Largest accepted `image` field: room for a JSON array of D numbers with 16 digits each."""
    return 24 * input_dim + 64


@dataclass
class Rejected:
    """An entry that cannot be scored and goes to the dead-letter stream."""

    entry_id: bytes
    fields: Mapping[bytes, bytes]
    code: str
    reason: str


@dataclass
class DecodedBatch:
    """The scorable part of a batch as one matrix, in entry order, plus the rejects.

    A batch of uint8 entries only (the usual one) keeps its raw pixels: they are scaled to float32
    where they are scored, so the loop hands a scoring process a quarter of the bytes and leaves
    it the multiplication."""

    ids: list[bytes]
    fields: list[Mapping[bytes, bytes]]
    dtypes: list[str]
    pixels: np.ndarray  # (len(ids), D): float32 in [0, 1], or uint8 to be multiplied by `scale`
    rejected: list[Rejected] = field(default_factory=list)
    scale: float | None = None  # set exactly when `pixels` are uint8

    @cached_property
    def images(self) -> np.ndarray:
        """(len(ids), D) float32 in [0, 1]: the pixels, scaled on first use."""
        return self.pixels if self.scale is None else scale_pixels(self.pixels, self.scale)

    def reject_rows(self, reasons: Mapping[int, str], code: str) -> DecodedBatch:
        """This batch without the rows in `reasons` (row -> reason), which join its rejects."""
        if not reasons:
            return self
        keep = [row for row in range(len(self.ids)) if row not in reasons]
        rejected = [*self.rejected]
        rejected.extend(
            Rejected(self.ids[row], self.fields[row], code, reason) for row, reason in reasons.items()
        )
        return DecodedBatch(
            ids=[self.ids[row] for row in keep],
            fields=[self.fields[row] for row in keep],
            dtypes=[self.dtypes[row] for row in keep],
            pixels=self.pixels[keep],
            rejected=rejected,
            scale=self.scale,
        )


def scale_pixels(pixels: np.ndarray, scale: float) -> np.ndarray:
    """uint8 pixels times `scale`, as a new float32 array (the one rounding of every engine)."""
    images = np.empty(pixels.shape, dtype=np.float32)
    np.multiply(pixels, np.float32(scale), out=images)
    return images


_EXACT_DTYPES = {name.encode(): name for name in DTYPES}


def _dtype_of(fields: Mapping[bytes, bytes]) -> str:
    raw = fields.get(b"dtype", b"uint8")
    exact = _EXACT_DTYPES.get(raw)  # what producers send; the rest is the lenient path
    if exact is not None:
        return exact
    try:
        name = raw.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        name = None
    if name not in DTYPES:
        shown = raw[:32].decode("utf-8", "replace")
        raise InvalidMessage(
            "unknown_dtype",
            f"dtype {shown!r} is not supported; expected one of {', '.join(DTYPES)}",
        )
    return name


def _check_floats(values: np.ndarray, dtype: str) -> None:
    """Reject NaN/inf and values outside [0, 1] for one image."""
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise InvalidMessage(
            "non_finite",
            f"pixel {bad} is {values[bad]!r}; expected finite values for dtype {dtype}",
        )
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise InvalidMessage(
            "out_of_range",
            f"pixel values span [{low:g}, {high:g}]; expected values in [0, 1] for dtype {dtype}",
        )


_NUMBER = re.compile(rb"\s*-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\s*")


def _decode_json(payload: bytes, dim: int) -> np.ndarray:
    """A flat JSON array of `dim` numbers in [0, 1], parsed without recursion and without a Python
    object per value (simdjson hands the array over as one buffer of doubles)."""
    text = payload.strip()
    if not text.startswith(b"["):
        kind = {b"{": "an object", b'"': "a string"}.get(text[:1], "not an array")
        raise InvalidMessage("bad_json", f"image JSON is {kind}, expected an array of {dim} numbers")
    if text.count(b"[") != 1 or b"{" in text:
        raise InvalidMessage(
            "bad_json", f"image JSON array is nested, expected a flat array of {dim} numbers"
        )
    document = None
    try:
        document = simdjson.Parser().parse(text)
        if not isinstance(document, simdjson.Array):  # the brackets above make this unreachable
            raise TypeError(f"a JSON {type(document).__name__}, not an array")
        values = np.frombuffer(document.as_buffer(of_type="d"), dtype=np.float64)
    except UnicodeDecodeError as exc:
        raise InvalidMessage("bad_json", f"image is not valid JSON: it is not UTF-8 ({exc.reason})") from exc
    except TypeError as exc:  # INCORRECT_TYPE: a value that is not a number
        index, token = _first_non_number(text)
        raise InvalidMessage(
            "not_numeric", f"image JSON value {index} is {_kind_of(token)} {token[:40]}, expected a number"
        ) from exc
    except Exception as exc:  # simdjson's ValueError/RuntimeError: malformed, NaN, too big a number
        if b"NaN" in text or b"Infinity" in text:
            raise InvalidMessage(
                "non_finite", "image JSON holds NaN or Infinity; expected finite values for dtype json"
            ) from exc
        raise InvalidMessage("bad_json", f"image is not valid JSON: {_first_line(exc)}") from exc
    finally:
        del document  # the parser's buffer is released with its document
    if len(values) != dim:
        raise InvalidMessage("bad_length", f"image JSON array has {len(values)} values, expected {dim}")
    _check_floats(values, "json")
    return values.astype(np.float32)


def _first_non_number(text: bytes) -> tuple[int, str]:
    """Where a flat JSON array stops holding numbers (only on the error path): index and token."""
    for index, token in enumerate(text.strip()[1:-1].split(b",")):
        if not _NUMBER.fullmatch(token):
            return index, token.strip().decode("utf-8", "replace")
    return -1, ""


def _kind_of(token: str) -> str:
    if token.startswith('"'):
        return "a string"
    if token in ("true", "false"):
        return "a boolean"
    return "null" if token == "null" else "not a number:"


def _first_line(exc: BaseException) -> str:
    return str(exc).split(".")[0][:200] or type(exc).__name__


def validate_entry(fields: Mapping[bytes, bytes], dim: int, max_payload_bytes: int) -> str:
    """Check the cheap, per-entry parts of the contract; return the dtype name."""
    payload = fields.get(b"image")
    if payload is None:
        raise InvalidMessage(
            "missing_image", "entry has no 'image' field; expected the image pixels in 'image'"
        )
    producer_id = fields.get(b"id")
    if producer_id is not None and len(producer_id) > MAX_ID_BYTES:
        raise InvalidMessage("bad_id", f"id has {len(producer_id)} bytes, expected at most {MAX_ID_BYTES}")
    if len(payload) > max_payload_bytes:
        raise InvalidMessage(
            "oversize",
            f"image has {len(payload)} bytes, more than the limit of {max_payload_bytes}",
        )
    dtype = _dtype_of(fields)
    expected = {"uint8": dim, "float32": 4 * dim}.get(dtype)
    if expected is not None and len(payload) != expected:
        raise InvalidMessage(
            "bad_length", f"image has {len(payload)} bytes, expected {expected} for dtype {dtype}"
        )
    return dtype


def decode_batch(
    entries: Sequence[Entry], dim: int, max_payload_bytes: int, uint8_scale: float = 1.0 / 255.0
) -> DecodedBatch:
    """Decode a batch into one (n, D) matrix; uint8 and float32 in one numpy call each. Total: an
    entry that cannot be decoded, whatever it holds, becomes a `Rejected` with a reason; nothing
    raises out of the batch."""
    try:
        fast = _decode_uniform(entries, dim, max_payload_bytes, uint8_scale)
    except Exception:  # an entry of an unforeseen shape: the long way refuses it alone
        fast = None
    if fast is not None:
        return fast
    try:
        return _decode_any(entries, dim, max_payload_bytes, uint8_scale)
    except Exception:  # a bug of the batch path: entry by entry, so only what fails is refused
        return _decode_one_by_one(entries, dim, max_payload_bytes, uint8_scale)


def _decode_one_by_one(
    entries: Sequence[Entry], dim: int, max_payload_bytes: int, uint8_scale: float
) -> DecodedBatch:
    ids: list[bytes] = []
    kept: list[Mapping[bytes, bytes]] = []
    dtypes: list[str] = []
    rows: list[np.ndarray] = []
    rejected: list[Rejected] = []
    for entry_id, fields in entries:
        try:
            one = _decode_any([(entry_id, fields)], dim, max_payload_bytes, uint8_scale)
        except Exception as exc:
            rejected.append(_unexpected(entry_id, fields, exc))
            continue
        rejected.extend(one.rejected)
        if one.ids:
            ids.append(entry_id)
            kept.append(fields)
            dtypes.extend(one.dtypes)
            rows.append(one.images[0])
    images = np.stack(rows) if rows else np.empty((0, dim), np.float32)
    return DecodedBatch(ids=ids, fields=kept, dtypes=dtypes, pixels=images, rejected=rejected)


def _decode_uniform(
    entries: Sequence[Entry], dim: int, max_payload_bytes: int, uint8_scale: float
) -> DecodedBatch | None:
    """The usual batch, every entry a valid image of one binary dtype: whole-batch checks only.

    None when any entry needs a closer look; `_decode_any` then gives the same result the long way
    (tests/unit/test_codec.py checks that both agree).
    """
    if not entries:
        return None
    fields = [f for _, f in entries]
    declared = {f.get(b"dtype", b"uint8") for f in fields}
    if declared == {b"uint8"}:
        dtype, size = "uint8", dim
    elif declared == {b"float32"}:
        dtype, size = "float32", 4 * dim
    else:
        return None
    payloads = [f.get(b"image", b"") for f in fields]
    if size > max_payload_bytes or set(map(len, payloads)) != {size}:
        return None
    if max(len(f.get(b"id", b"")) for f in fields) > MAX_ID_BYTES:
        return None
    joined = b"".join(payloads)
    n = len(entries)
    scale = None
    images: np.ndarray
    if dtype == "uint8":
        images = np.frombuffer(joined, dtype=np.uint8).reshape(n, dim)  # scaled where it is scored
        scale = uint8_scale
    else:
        images = np.frombuffer(joined, dtype="<f4").astype(np.float32).reshape(n, dim)  # writable copy
        # min and max are NaN if any value is, and NaN fails both tests: the long way names it.
        if not (images.min() >= 0.0 and images.max() <= 1.0):
            return None
    return DecodedBatch(
        ids=[entry_id for entry_id, _ in entries],
        fields=fields,
        dtypes=[dtype] * n,
        pixels=images,
        scale=scale,
    )


def _decode_any(
    entries: Sequence[Entry], dim: int, max_payload_bytes: int, uint8_scale: float
) -> DecodedBatch:
    """Validate entry by entry; mixed dtypes, JSON and rejects."""
    kinds: list[str] = []
    rejected: list[Rejected] = []
    accepted: list[int] = []
    for index, (entry_id, fields) in enumerate(entries):
        try:
            kinds.append(validate_entry(fields, dim, max_payload_bytes))
            accepted.append(index)
        except InvalidMessage as exc:
            rejected.append(Rejected(entry_id, fields, exc.code, exc.reason))
        except Exception as exc:  # a field shape nobody foresaw: this entry's dead letter, not the batch's
            rejected.append(_unexpected(entry_id, fields, exc))

    images = np.empty((len(accepted), dim), dtype=np.float32)
    rows_by_dtype: dict[str, list[int]] = {name: [] for name in DTYPES}
    for row, kind in enumerate(kinds):
        rows_by_dtype[kind].append(row)

    if rows := rows_by_dtype["uint8"]:
        joined = b"".join(entries[accepted[r]][1][b"image"] for r in rows)
        pixels = np.frombuffer(joined, dtype=np.uint8).reshape(len(rows), dim)
        if len(rows) == len(kinds):  # the usual all-uint8 batch: scale in place, no temporary
            np.multiply(pixels, np.float32(uint8_scale), out=images)
        else:
            images[rows] = pixels * np.float32(uint8_scale)

    bad_rows: dict[int, InvalidMessage] = {}
    if rows := rows_by_dtype["float32"]:
        joined = b"".join(entries[accepted[r]][1][b"image"] for r in rows)
        block = np.frombuffer(joined, dtype="<f4").reshape(len(rows), dim)
        finite = np.isfinite(block).all(axis=1)
        with np.errstate(invalid="ignore"):
            in_range = ((block >= 0.0) & (block <= 1.0)).all(axis=1)
        for i in np.flatnonzero(~(finite & in_range)):
            try:
                _check_floats(block[i], "float32")
            except InvalidMessage as float_error:
                bad_rows[rows[i]] = float_error
        if len(rows) == len(kinds):
            np.copyto(images, block)
        else:
            images[rows] = block

    for r in rows_by_dtype["json"]:
        try:
            images[r] = _decode_json(entries[accepted[r]][1][b"image"], dim)
        except InvalidMessage as json_error:
            bad_rows[r] = json_error
        except Exception as exc:  # anything else the parser raised: this entry alone is refused
            bad_rows[r] = InvalidMessage("decode_error", _unexpected_reason(exc))

    if bad_rows:
        for r, problem in bad_rows.items():
            entry_id, fields = entries[accepted[r]]
            rejected.append(Rejected(entry_id, fields, problem.code, problem.reason))
        keep = [r for r in range(len(accepted)) if r not in bad_rows]
        images = images[keep]
        accepted = [accepted[r] for r in keep]
        kinds = [kinds[r] for r in keep]

    return DecodedBatch(
        ids=[entries[i][0] for i in accepted],
        fields=[entries[i][1] for i in accepted],
        dtypes=kinds,
        pixels=images,
        rejected=rejected,
    )


def _unexpected_reason(exc: BaseException) -> str:
    return f"the entry could not be decoded ({type(exc).__name__}: {str(exc)[:200]})"


def _unexpected(entry_id: bytes, fields: Mapping[bytes, bytes], exc: BaseException) -> Rejected:
    return Rejected(entry_id, fields, "decode_error", _unexpected_reason(exc))


def encode_image(image: np.ndarray, dtype: str = "uint8") -> dict[str, bytes]:
    """Encode one flattened image for the input stream (what producers send).

    uint8 accepts a uint8 array (raw pixels) or floats in [0, 1] (rounded to 0-255).
    """
    flat = np.asarray(image).ravel()
    if dtype == "uint8":
        if flat.dtype != np.uint8:
            flat = np.clip(np.rint(flat.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        payload = flat.tobytes()
    elif dtype == "float32":
        as_float = flat.astype("<f4") if flat.dtype != np.uint8 else (flat / 255.0).astype("<f4")
        payload = as_float.tobytes()
    elif dtype == "json":
        as_float = flat.astype(np.float64) if flat.dtype != np.uint8 else flat / 255.0
        payload = json.dumps([round(float(v), 6) for v in as_float]).encode()
    else:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    return {"image": payload, "dtype": dtype.encode()}
