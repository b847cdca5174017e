"""Per-key request limits shared by every API process: a request rate and a duplicate filter.

The rate is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp per key):
a key may send `burst` requests at once, then one every 60 / requests_per_minute seconds. Each
decision is one Lua script, so concurrent API processes never both take the last token. The clock
is Redis's own (`TIME`), so API hosts whose clocks differ agree; tests inject one instead.

The third limit, a cap on a key's unfinished jobs, lives in the job store (storage/jobs.py): it
must be one step with creating the job, and so holds whenever a job can be created at all.

When the limiter's Redis cannot be reached, `when_down` decides: "open" admits the request (a
warning is logged once per outage), "closed" refuses it with 503.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from dreamq.errors import RateLimited, ServiceUnavailable
from dreamq.settings import PlanLimits
from storage import keys

log = logging.getLogger("dreamq.limits")

WhenDown = Literal["open", "closed"]
UNAVAILABLE = "The rate limiter is unavailable, try again later."

# The current time: the caller's (ARGV) when given, else Redis's.
_NOW = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS: the key's rate state. ARGV: now ('' for Redis time), seconds per request, burst.
# The state is the theoretical arrival time (TAT) of the next request at the sustained rate; a
# request is admitted while TAT - now stays within (burst - 1) intervals. Returns {1, ''} when
# admitted (TAT advanced), {0, seconds until it would be} when refused (nothing written).
_RATE = (
    _NOW
    + """
local interval, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - (burst - 1) * interval - now
if wait > 0 then return {0, string.format('%.6f', wait)} end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.6f', next_tat),
  'PX', math.ceil((next_tat - now) * 1000) + 1000)
return {1, ''}
"""
)

# KEYS: the duplicate marker. ARGV: now ('' for Redis time), window seconds. The marker holds
# when its window ends (the expiry is only a collector, so an injected clock works the same).
# Returns {1, ''} when first seen (marked), {0, seconds left} for a duplicate.
_DUPLICATE = (
    _NOW
    + """
local until_ = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ > now then return {0, string.format('%.6f', until_ - now)} end
local window = tonumber(ARGV[2])
redis.call('SET', KEYS[1], string.format('%.6f', now + window),
  'PX', math.ceil(window * 1000) + 1000)
return {1, ''}
"""
)


def fingerprint(kind: str, body: dict[str, Any]) -> str:
    """A digest of what a request asks for: its endpoint kind and its body in canonical form,
    without the key."""
    canonical = json.dumps(
        {"kind": kind, "body": {k: v for k, v in body.items() if k != "key"}},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class RateLimiter:
    """The API's limiter. Every refusal raises RateLimited with a Retry-After."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        when_down: WhenDown = "open",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._client = client
        self._when_down = when_down
        self._clock = clock
        self._rate = client.register_script(_RATE)
        self._duplicate = client.register_script(_DUPLICATE)
        self._down = False
        """Whether the last call found Redis unreachable: one warning per outage, not per call."""

    def _now(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    async def hit(self, key_id: str, plan: PlanLimits) -> None:
        """Count one request that starts work; RateLimited when over the plan's rate."""
        burst = plan.effective_burst
        if plan.requests_per_minute is None or burst is None:
            return
        interval = 60.0 / plan.requests_per_minute
        args = [self._now(), repr(interval), burst]
        reply = await self._call(self._rate, [keys.rate_limit(key_id)], args)
        if reply is not None and int(reply[0]) == 0:
            raise RateLimited(float(reply[1]))

    async def check_duplicate(self, key_id: str, digest: str, window_seconds: int) -> str | None:
        """Mark this request as seen for `window_seconds`; RateLimited when the key made the same
        one within the window. Returns the marker, for `forget` when the request then fails."""
        if window_seconds <= 0:
            return None
        marker = keys.duplicate_request(key_id, digest)
        reply = await self._call(self._duplicate, [marker], [self._now(), window_seconds])
        if reply is None:
            return None
        if int(reply[0]) == 0:
            left = float(reply[1])
            raise RateLimited(
                left,
                f"an identical request was made less than {window_seconds} seconds ago; "
                f"try again in {max(1, math.ceil(left))} s.",
            )
        return marker

    async def forget(self, marker: str | None) -> None:
        """Unmark a request that was refused or failed after its duplicate check, so that
        sending it again is not refused as a duplicate."""
        if marker is None:
            return
        try:
            await self._client.delete(marker)
        except (RedisError, OSError):
            # Best effort, on a path already failing: the marker expires with its window.
            log.debug("could not unmark a duplicate-filter marker", exc_info=True)

    async def _call(self, script: Any, keys_: list[str], args: list[Any]) -> Any:
        try:
            reply = await script(keys=keys_, args=args)
        except (RedisError, OSError):
            if not self._down:
                self._down = True
                what = "admitting requests unthrottled" if self._when_down == "open" else "refusing"
                log.warning(
                    "rate limiter Redis unreachable: %s until it is back "
                    "(DREAMQ_RATE_LIMIT_WHEN_DOWN=%s)",
                    what,
                    self._when_down,
                    exc_info=True,
                )
            if self._when_down == "closed":
                raise ServiceUnavailable(UNAVAILABLE) from None
            return None
        if self._down:
            self._down = False
            log.warning("rate limiter Redis reachable again: limits apply")
        return reply
