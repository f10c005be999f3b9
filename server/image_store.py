"""Images kept for ``response_format="url"``: in memory, with an expiry and a size cap."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires: float


class ImageStore:
    def __init__(self, ttl_s: float, max_bytes: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> tuple[str, float]:
        image_id = "img_" + secrets.token_urlsafe(18)
        expires = self._clock() + self.ttl_s
        with self._lock:
            self._items[image_id] = StoredImage(data, media_type, expires)
            self._bytes += len(data)
            self._evict_locked()
        return image_id, expires

    def get(self, image_id: str) -> StoredImage | None:
        with self._lock:
            self._evict_locked()
            return self._items.get(image_id)

    def _evict_locked(self) -> None:
        now = self._clock()
        # Oldest first: both the expiry and the byte cap drop from the front.
        while self._items:
            oldest_id, oldest = next(iter(self._items.items()))
            if oldest.expires > now and self._bytes <= self.max_bytes:
                break
            del self._items[oldest_id]
            self._bytes -= len(oldest.data)
