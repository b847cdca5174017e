"""API keys, stored hashed. The plaintext is shown once, at creation, and never stored or logged.

A key names its plan (the limits of storage/limits.py; none stored means the deployment's default
plan). Revoking a key takes effect on the next request: every request reads the key's record, and
nothing caches it.

Each key also holds the Standard Webhooks secret its jobs' webhooks are signed with. A rotation
makes a new secret primary and keeps the old one valid (signed alongside) for a window, so a
receiver can switch without missing a delivery.
"""

from __future__ import annotations

import builtins
import hashlib
import secrets
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import redis
import redis.asyncio as aioredis

from dreamq.signing import new_secret
from storage import keys
from storage.wire import Command, Wire, wire_of

KEY_PREFIX = "dq_"


@dataclass(frozen=True)
class KeyInfo:
    id: str
    """Stable public id of the key: the owner written on its jobs."""
    name: str
    created_at: float
    revoked: bool = False
    plan: str | None = None
    """The key's plan name; None: the deployment's default plan (DREAMQ_DEFAULT_PLAN)."""


@dataclass(frozen=True)
class WebhookSecrets:
    primary: str = field(repr=False)
    previous: str | None = field(default=None, repr=False)
    previous_until: float | None = None
    """Until when (epoch seconds) the previous secret still signs, after a rotation."""

    def signing(self, now: float) -> list[str]:
        """The secrets a delivery made at `now` is signed with, primary first."""
        valid = [self.primary]
        if self.previous and self.previous_until is not None and now < self.previous_until:
            valid.append(self.previous)
        return valid


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
        plan=text.get("plan") or None,
    )


class UnknownPlan(ValueError):
    def __init__(self, plan: str, plans: Collection[str]) -> None:
        super().__init__(f"unknown plan {plan!r} (plans: {', '.join(sorted(plans))})")


class ApiKeyStore:
    """Synchronous key management: the CLI and the dev stack."""

    def __init__(self, client: redis.Redis, *, plans: Collection[str] | None = None) -> None:
        self._r = client
        self._plans = plans
        """The configured plan names: given, a key is never put on another (UnknownPlan)."""

    def _check_plan(self, plan: str | None) -> None:
        if plan is not None and self._plans is not None and plan not in self._plans:
            raise UnknownPlan(plan, self._plans)

    def create(self, name: str, *, plan: str | None = None) -> tuple[str, KeyInfo]:
        self._check_plan(plan)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        return key, self.register(key, name, plan=plan)

    def register(
        self,
        key: str,
        name: str,
        *,
        webhook_secret: str | None = None,
        plan: str | None = None,
    ) -> KeyInfo:
        """Store a given key (the dev stack's fixed key); idempotent for the same key, whose
        plan it leaves alone. A given `webhook_secret` (the dev stack's fixed one) replaces the
        key's secret."""
        self._check_plan(plan)
        digest = hash_key(key)
        existing = self._r.hgetall(keys.api_key(digest))
        if existing:
            if webhook_secret:
                self._r.hset(keys.api_key(digest), "webhook_secret", webhook_secret)
            return _decode(existing)
        info = KeyInfo(id=secrets.token_hex(8), name=name, created_at=time.time(), plan=plan)
        pipe = self._r.pipeline()
        pipe.hset(
            keys.api_key(digest),
            mapping={
                "id": info.id,
                "name": name,
                "created_at": info.created_at,
                "revoked": "0",
                "webhook_secret": webhook_secret or new_secret(),
            },
        )
        if plan is not None:
            pipe.hset(keys.api_key(digest), "plan", plan)
        pipe.hset(keys.API_KEY_NAMES, info.id, digest)
        pipe.execute()
        return info

    def lookup(self, key: str) -> KeyInfo | None:
        raw = self._r.hgetall(keys.api_key(hash_key(key)))
        info = _decode(raw) if raw else None
        return info if info and not info.revoked else None

    def _record(self, key_id: str) -> str | None:
        """The Redis name of the record of the key with public id `key_id`."""
        digest = self._r.hget(keys.API_KEY_NAMES, key_id)
        return None if digest is None else keys.api_key(_text(digest))

    def get(self, key_id: str) -> KeyInfo | None:
        record = self._record(key_id)
        raw = self._r.hgetall(record) if record else None
        return _decode(raw) if raw else None

    def revoke(self, key_id: str) -> KeyInfo | None:
        """Refuse the key from its next request on (its record stays, for `list`); None when
        no key has that id. Its jobs already accepted still run."""
        record = self._record(key_id)
        if record is None or not self._r.exists(record):
            return None
        self._r.hset(record, "revoked", "1")
        return self.get(key_id)

    def set_plan(self, key_id: str, plan: str) -> KeyInfo | None:
        """Move the key to `plan` from its next request on; None when no key has that id."""
        self._check_plan(plan)
        record = self._record(key_id)
        if record is None or not self._r.exists(record):
            return None
        self._r.hset(record, "plan", plan)
        return self.get(key_id)

    def webhook_secrets(self, key_id: str) -> WebhookSecrets | None:
        """The signing secrets of a key by its public id (a job's owner); None when the key is
        unknown or predates signing (its deliveries then go unsigned until a rotation)."""
        digest = self._r.hget(keys.API_KEY_NAMES, key_id)
        if digest is None:
            return None
        raw = _text_map(self._r.hgetall(keys.api_key(_text(digest))))
        if not raw.get("webhook_secret"):
            return None
        until = raw.get("webhook_secret_previous_until")
        return WebhookSecrets(
            primary=raw["webhook_secret"],
            previous=raw.get("webhook_secret_previous") or None,
            previous_until=float(until) if until else None,
        )

    def rotate_webhook_secret(
        self, key_id: str, *, window_seconds: float, now: float | None = None
    ) -> WebhookSecrets | None:
        """A new primary secret; the current one keeps signing for `window_seconds`."""
        digest = self._r.hget(keys.API_KEY_NAMES, key_id)
        if digest is None:
            return None
        record = keys.api_key(_text(digest))
        current = self.webhook_secrets(key_id)
        until = (time.time() if now is None else now) + window_seconds
        pipe = self._r.pipeline()
        pipe.hset(record, "webhook_secret", new_secret())
        if current is not None:
            pipe.hset(
                record,
                mapping={"webhook_secret_previous": current.primary,
                         "webhook_secret_previous_until": until},
            )  # fmt: skip
        pipe.execute()
        return self.webhook_secrets(key_id)

    # Last in the class: below it, `list` in an annotation would name this method.
    def list(self) -> builtins.list[KeyInfo]:
        """Every key, revoked ones included, oldest first: never the key or its hash."""
        digests = self._r.hvals(keys.API_KEY_NAMES)
        pipe = self._r.pipeline(transaction=False)
        for digest in digests:
            pipe.hgetall(keys.api_key(_text(digest)))
        found = [_decode(raw) for raw in pipe.execute() if raw]
        return sorted(found, key=lambda info: (info.created_at, info.id))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _text_map(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


class AsyncApiKeyStore:
    """The API's read-only view: authenticate a request."""

    def __init__(self, client: aioredis.Redis | Wire) -> None:
        self._r = wire_of(client)

    async def lookup(self, key: str | None) -> KeyInfo | None:
        """The key's record, read afresh on every request (a revocation applies to the next
        one): one HMGET of the fields a request needs, not the whole hash (its webhook secrets
        are the dispatcher's business)."""
        if not _well_formed(key):
            return None
        return _looked_up(await self._r.call("HMGET", _lookup_record(key), *_LOOKUP_FIELDS))

    async def lookup_with(
        self, key: str | None, commands: Sequence[Command]
    ) -> tuple[KeyInfo | None, list[Any]]:
        """`lookup`, and in the same round trip `commands` (their replies, in order). A
        malformed key reads nothing."""
        if not _well_formed(key):
            return None, []
        values, *replies = await self._r.calls(
            [("HMGET", _lookup_record(key), *_LOOKUP_FIELDS), *commands]
        )
        return _looked_up(values), replies


def _well_formed(key: str | None) -> TypeGuard[str]:
    """Whether `key` can be a key at all (else no need to ask Redis)."""
    return key is not None and key.startswith(KEY_PREFIX) and len(key) <= 128


def _lookup_record(key: str) -> str:
    return keys.api_key(hash_key(key))


def _looked_up(values: list[Any]) -> KeyInfo | None:
    """The key an HMGET of `_LOOKUP_FIELDS` found: None for no record or a revoked one."""
    if values[0] is None:  # no record: an unknown key
        return None
    info = _decode({f: v for f, v in zip(_LOOKUP_FIELDS, values, strict=True) if v is not None})
    return None if info.revoked else info


_LOOKUP_FIELDS = ("id", "name", "created_at", "revoked", "plan")
"""What `_decode` reads of a key's record."""
