"""Every Redis key name dreamq uses, in one place."""

from __future__ import annotations

PREFIX = "dreamq"

JOB_SEQ = f"{PREFIX}:job:seq"
"""INCR counter that hands out integer job ids."""

ACTIVE_JOBS = f"{PREFIX}:jobs:active"
"""Sorted set of non-terminal job ids, scored by id: the queue as clients see it."""

JOB_EVENTS = f"{PREFIX}:events:jobs"
"""Pub/sub channel: '<id> <status>' on every terminal transition, '<id> webhook_<status>' when a
webhook delivery ends."""

WORKERS = f"{PREFIX}:workers"
"""Sorted set of worker names scored by the time of their last heartbeat."""

CONTROL = f"{PREFIX}:control"
"""Pub/sub channel of commands to every worker process: 'warm <model_id>'."""

WORKER_MODELS = f"{PREFIX}:workers:models"
"""Hash worker process name -> JSON list of the model ids it holds in memory."""

STATS_ALL = f"{PREFIX}:stats:_all"
"""Hash of fleet-wide run-time statistics."""


def job(job_id: int) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_lease(job_id: int) -> str:
    """The token of the worker process running the job; expires with the lease."""
    return f"{PREFIX}:job:{job_id}:lease"


def model_stats(model_id: str) -> str:
    return f"{PREFIX}:stats:model:{model_id}"


def api_key(key_hash: str) -> str:
    return f"{PREFIX}:apikey:{key_hash}"


API_KEY_NAMES = f"{PREFIX}:apikeys"
"""Hash key-id -> key hash, so keys can be listed without SCAN."""
