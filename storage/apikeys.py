"""API keys, stored hashed. The plaintext is shown once, at creation, and never stored or logged."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from storage import keys

KEY_PREFIX = "dq_"


@dataclass(frozen=True)
class KeyInfo:
    id: str
    """Stable public id of the key: the owner written on its jobs."""
    name: str
    created_at: float
    revoked: bool = False


def hash_key(key: str) -> str:
    # Keys are 256-bit random tokens, so one SHA-256 is enough: there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def _decode(raw: dict[Any, Any]) -> KeyInfo:
    text = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    return KeyInfo(
        id=text["id"],
        name=text["name"],
        created_at=float(text["created_at"]),
        revoked=text.get("revoked") == "1",
    )


class ApiKeyStore:
    """Synchronous key management: the CLI and the dev stack."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    def create(self, name: str) -> tuple[str, KeyInfo]:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        return key, self.register(key, name)

    def register(self, key: str, name: str) -> KeyInfo:
        """Store a given key (the dev stack's fixed key); idempotent for the same key."""
        digest = hash_key(key)
        existing = self._r.hgetall(keys.api_key(digest))
        if existing:
            return _decode(existing)
        info = KeyInfo(id=secrets.token_hex(8), name=name, created_at=time.time())
        pipe = self._r.pipeline()
        pipe.hset(
            keys.api_key(digest),
            mapping={"id": info.id, "name": name, "created_at": info.created_at, "revoked": "0"},
        )
        pipe.hset(keys.API_KEY_NAMES, info.id, digest)
        pipe.execute()
        return info

    def lookup(self, key: str) -> KeyInfo | None:
        raw = self._r.hgetall(keys.api_key(hash_key(key)))
        info = _decode(raw) if raw else None
        return info if info and not info.revoked else None


class AsyncApiKeyStore:
    """The API's read-only view: authenticate a request."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._r = client

    async def lookup(self, key: str | None) -> KeyInfo | None:
        if not key or not key.startswith(KEY_PREFIX) or len(key) > 128:
            return None
        raw = await self._r.hgetall(keys.api_key(hash_key(key)))
        info = _decode(raw) if raw else None
        return info if info and not info.revoked else None
