"""Where sessions live: one small interface, a file store and a Redis store."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import INT64_MAX, INT64_MIN, OutOfRange, PruneReport, Record, Stats, StorageError, Store, hashed_id
from .files import FileStore

__all__ = [
    "INT64_MAX", "INT64_MIN", "OutOfRange", "PruneReport", "Record", "Stats", "StorageError", "Store", "hashed_id",
    "make_store",
]  # fmt: skip


def make_store(config: Mapping[str, Any]) -> Store:
    """Build the store that the configuration asks for."""
    url = config.get("REDIS_URL")
    if url:
        # Imported here so that the file store needs no Redis client.
        from .redis import RedisStore

        return RedisStore(
            url,
            timeout=float(config["REDIS_TIMEOUT"]),
            prefix=config["REDIS_PREFIX"],
            replicas=int(config["REDIS_REPLICAS"]),
        )
    return FileStore(config["SESSION_DIR"], fsync=bool(config["SESSION_FSYNC"]))
