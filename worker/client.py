"""What producers import: encode images and push them to the input stream.

    from worker.client import ImageProducer
    producer = ImageProducer(redis.Redis(), stream="images")
    producer.push(image)                      # one flattened image, uint8 or floats in [0, 1]
    producer.push_many(images, ids=[...])     # pipelined, one round trip per chunk

Entry fields: image (bytes), dtype (uint8|float32|json), id (optional, echoed in the output).
The stream is capped with MAXLEN ~ (approximate trimming) so Redis memory stays bounded; pick a
cap well above the backlog your workers may face: an entry trimmed before it is scored is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.codec import encode_image


class ImageProducer:
    """Pushes images to one stream."""

    def __init__(
        self,
        client: Any,
        stream: str = "images",
        dtype: str = "uint8",
        maxlen: int | None = 1_000_000,
    ) -> None:
        self.redis = client
        self.stream = stream
        self.dtype = dtype
        self.maxlen = maxlen

    def push(self, image: np.ndarray, producer_id: str | None = None) -> bytes:
        """XADD one image; returns its entry id."""
        fields = self._fields(image, producer_id)
        entry_id: bytes = self.redis.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
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
                    self.stream,
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
