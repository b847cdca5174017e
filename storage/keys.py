"""Every Redis key name dreamq uses, in one place."""

from __future__ import annotations

PREFIX = "dreamq"

JOB_SEQ = f"{PREFIX}:job:seq"
"""INCR counter that hands out integer job ids."""

ACTIVE_JOBS = f"{PREFIX}:jobs:active"
"""Sorted set of non-terminal job ids, scored by id: the queue as clients see it."""

QUEUED_JOBS = f"{PREFIX}:jobs:queued"
"""Sorted set of the ids of queued jobs (accepted, not yet claimed by a worker), scored by
`level x LEVEL_SPAN + id`: the order workers take them in (a lower priority level first, then
first come), so a job's queue position. Kept by the job store's create and transition scripts."""

LEVEL_SPAN = 2**40
"""Score distance between priority levels in `QUEUED_JOBS`: above any job id."""

QUEUED_WORK = f"{PREFIX}:jobs:queued:seconds"
"""Hash priority level -> the predicted run seconds of the queued jobs of that level, summed
(HINCRBYFLOAT in the same scripts): the work ahead of a new job, read in O(1)."""

RUNNING_JOBS = f"{PREFIX}:jobs:running"
"""Sorted set of the ids of jobs a worker runs, scored by when they are expected to finish
(claim time + predicted run seconds): the part of the workers' time already spoken for."""

JOB_EVENTS = f"{PREFIX}:events:jobs"
"""Pub/sub channel: '<id> <status>' on every terminal transition, '<id> webhook_<status>' when a
webhook delivery ends."""

WORKERS = f"{PREFIX}:workers"
"""Sorted set of generation worker names scored by the time of their last heartbeat while
consuming: the ETA's "workers serving the queue"."""

WORKER_INDEX = f"{PREFIX}:workers:all"
"""Sorted set of every worker's name (both roles) scored by its last heartbeat: the index of the
`worker(name)` records that `dreamq workers` reads."""

CONTROL = f"{PREFIX}:control"
"""Pub/sub channel of commands to every worker process: 'warm <model_id>'."""

WORKER_MODELS = f"{PREFIX}:workers:models"
"""Hash worker process name ('<host>:<pid>' of a pool process) -> JSON list of the model ids it
holds in memory."""

WORKER_MODELS_EXPIRY = f"{PREFIX}:workers:models:expiry"
"""Sorted set of the `WORKER_MODELS` fields scored by the time after which the entry is dead: the
process's control loop pushes it forward; readers drop entries past it."""

WORKER_BUSY = f"{PREFIX}:workers:busy"
"""Hash worker process name -> JSON {"node": its Celery node name, "until": when the work it
claimed last is expected to end}: written by every claim (storage/claims.py), read by the
others to judge whether a queued job is better left to a process that holds its model warm."""

WEBHOOKS_PENDING = f"{PREFIX}:webhooks:pending"
"""Sorted set of finished jobs whose webhook delivery is still pending, scored by when its next
attempt is due: the reconciler re-drives a delivery whose broker message was lost."""

RECONCILER_LOCK = f"{PREFIX}:reconciler:lock"
"""Held by the one reconciler that runs in the fleet (token, with an expiry)."""

STATS_ALL = f"{PREFIX}:stats:_all"
"""Hash of fleet-wide run-time statistics."""


def job(job_id: int) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_lease(job_id: int) -> str:
    """The token of the worker process running the job; expires with the lease."""
    return f"{PREFIX}:job:{job_id}:lease"


def worker(name: str) -> str:
    """A worker's liveness record (JSON), which expires when its heartbeats stop."""
    return f"{PREFIX}:worker:{name}"


def model_stats(model_id: str) -> str:
    return f"{PREFIX}:stats:model:{model_id}"


def api_key(key_hash: str) -> str:
    return f"{PREFIX}:apikey:{key_hash}"


API_KEY_NAMES = f"{PREFIX}:apikeys"
"""Hash key-id -> key hash, so keys can be listed without SCAN."""


UNFINISHED_JOBS_PREFIX = f"{PREFIX}:owner:unfinished:"
"""The job store's terminal script builds `unfinished_jobs(owner)` from this: its caller knows
the job id, not the owner."""


def unfinished_jobs(owner: str) -> str:
    """Sorted set of the ids of a key's queued and processing jobs, scored by creation time: the
    per-key cap on unfinished jobs, kept by the job store's create and terminal scripts."""
    return f"{UNFINISHED_JOBS_PREFIX}{owner}"


def rate_limit(key_id: str) -> str:
    """A key's request-rate state (GCRA: the theoretical arrival time), expiring when idle."""
    return f"{PREFIX}:limit:rate:{key_id}"


def duplicate_request(key_id: str, fingerprint: str) -> str:
    """Marks a request of this key with this body as seen, until the duplicate window ends."""
    return f"{PREFIX}:limit:dup:{key_id}:{fingerprint}"
