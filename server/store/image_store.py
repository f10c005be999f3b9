"""Images kept for ``response_format="url"``: in memory, with an expiry and a size cap.

The cap is shared, the eviction is per owner (the API key that made the image): over the
cap, the owner holding the most bytes loses its oldest image. One key's burst therefore
evicts its own images, never pushes another key below what the burster itself holds, and
every key keeps at least its fair share (the cap over the keys holding images).
"""

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
    owner: str | None = None


class ImageStore:
    def __init__(self, ttl_s: float, max_bytes: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: dict[str, StoredImage] = {}
        # Per owner, its images oldest first (one TTL for all: also soonest to expire).
        self._owned: dict[str | None, OrderedDict[str, None]] = {}
        self._owner_bytes: dict[str | None, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str, owner: str | None = None
            ) -> tuple[str, float]:
        """Keep ``data`` for ``ttl_s``; ``owner`` is whose share it counts against."""
        image_id = "img_" + secrets.token_urlsafe(18)
        expires = self._clock() + self.ttl_s
        with self._lock:
            self._items[image_id] = StoredImage(data, media_type, expires, owner)
            self._owned.setdefault(owner, OrderedDict())[image_id] = None
            self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + len(data)
            self._bytes += len(data)
            self._evict_locked()
        return image_id, expires

    def get(self, image_id: str) -> StoredImage | None:
        with self._lock:
            self._evict_locked()
            return self._items.get(image_id)

    def _evict_locked(self) -> None:
        now = self._clock()
        for owner, ids in list(self._owned.items()):
            while ids and self._items[next(iter(ids))].expires <= now:
                self._drop_locked(owner, next(iter(ids)))
        while self._bytes > self.max_bytes:
            largest = max(self._owner_bytes, key=lambda o: self._owner_bytes[o])
            self._drop_locked(largest, next(iter(self._owned[largest])))

    def _drop_locked(self, owner: str | None, image_id: str) -> None:
        image = self._items.pop(image_id)
        ids = self._owned[owner]
        del ids[image_id]
        self._bytes -= len(image.data)
        self._owner_bytes[owner] -= len(image.data)
        if not ids:
            del self._owned[owner], self._owner_bytes[owner]
