"""What producers import: encode images and push them to the input stream.

    from producer.client import ImageProducer
    producer = ImageProducer(redis.Redis(), stream="images")
    producer.push(image)                      # one flattened image, uint8 or floats in [0, 1]
    producer.push_many(images, ids=[...])     # pipelined, one round trip per chunk

    producer = ImageProducer(redis.Redis(), stream="images", shards=6)   # images:{0} .. images:{5}

With shards > 1 each image goes to one shard: a stable hash of its producer id (the same id always
lands on the same shard, so one source's images stay in order), or round robin without an id.

Entry fields: image (bytes), dtype (uint8|float32|json), id (optional, echoed in the output).
The stream is capped with MAXLEN ~ (approximate trimming) so Redis memory stays bounded; pick a
cap well above the backlog your workers may face: an entry trimmed before it is scored is lost.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from contract.codec import encode_image
from contract.shards import shard_key, shard_of_id


class ImageProducer:
    """Pushes images to one stream, or to the shards of a sharded one (`shards` > 1)."""

    def __init__(
        self,
        client: Any,
        stream: str = "images",
        dtype: str = "uint8",
        maxlen: int | None = 1_000_000,
        shards: int = 1,
    ) -> None:
        if shards < 1:
            raise ValueError(f"shards must be 1 or more, found {shards}")
        if shards > 1 and ("{" in stream or "}" in stream):
            raise ValueError(
                f"with shards > 1 the stream name gets the hash tag :{{i}}; found braces in {stream!r}"
            )
        self.redis = client
        self.stream = stream
        self.dtype = dtype
        self.maxlen = maxlen
        self.shards = shards
        self.streams = [shard_key(stream, i) for i in range(shards)] if shards > 1 else [stream]
        self._round_robin = itertools.cycle(range(shards))

    def shard_of(self, producer_id: str | None) -> int:
        """The shard of an image: CRC-32 of its producer id modulo shards (contract.shards), or the
        next in turn."""
        if self.shards == 1:
            return 0
        if producer_id is None:
            return next(self._round_robin)
        return shard_of_id(producer_id, self.shards)

    def push(self, image: np.ndarray, producer_id: str | None = None) -> bytes:
        """XADD one image; returns its entry id."""
        fields = self._fields(image, producer_id)
        key = self.streams[self.shard_of(producer_id)]
        entry_id: bytes = self.redis.xadd(key, fields, maxlen=self.maxlen, approximate=True)
        return entry_id

    def push_many(
        self, images: np.ndarray, ids: Sequence[str] | None = None, chunk: int = 500
    ) -> list[bytes]:
        """XADD many images with a pipeline (one round trip per `chunk`)."""
        if ids is not None and len(ids) != len(images):
            raise ValueError(f"got {len(images)} images but {len(ids)} ids")
        out: list[bytes] = []
        for start in range(0, len(images), chunk):
            pipe = self.redis.pipeline(transaction=False)
            for i in range(start, min(start + chunk, len(images))):
                pipe.xadd(
                    self.streams[self.shard_of(None if ids is None else ids[i])],
                    self._fields(images[i], None if ids is None else ids[i]),
                    maxlen=self.maxlen,
                    approximate=True,
                )
            out.extend(pipe.execute())
        return out

    def _fields(self, image: np.ndarray, producer_id: str | None) -> dict[str, bytes | str]:
        fields: dict[str, bytes | str] = dict(encode_image(image, self.dtype))
        if producer_id is not None:
            fields["id"] = producer_id
        return fields
