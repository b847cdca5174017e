"""Worker liveness records: who runs, what it consumes, what its processes hold in memory.

A worker's process can stay up while it has stopped consuming (after a broker reconnect, celery
#8082, #10205), so liveness here is measured by consumption, not by a PID. Every worker main
process (`dreamq worker` and `dreamq dispatcher`) writes its record every
DREAMQ_HEARTBEAT_SECONDS (`workers/liveness.py`):

- `dreamq:worker:<name>`: a JSON `WorkerRecord` with an expiry of `RECORD_TTL_INTERVALS`
  intervals, indexed by name in the sorted set `dreamq:workers:all` (scored by its heartbeat);
- a generation worker that is consuming also scores its name in `dreamq:workers`, which the ETA
  counts (`storage/eta.py`: unchanged, heartbeats under 30 s old).

Each pool process of a generation worker publishes the models it holds under `<host>:<pid>` in
the hash `dreamq:workers:models` (`workers/control.py`), with a deadline in
`dreamq:workers:models:expiry` that its control loop pushes forward every interval. Entries past
their deadline (a process killed with -9) are pruned by every heartbeat and every reader; the main
process also drops the entries of its own pool processes as soon as they are gone. The status
attributes entries to a worker through the pool pids in its record.

States (`assess`), with T = `STALE_AFTER_INTERVALS` x the worker's own heartbeat interval:

- **stale**: no heartbeat for more than T (the process is dead, hung, or cut off from Redis);
- **stalled**: heartbeats arrive, but the worker does not consume: its consumer has not been
  connected and consuming all of its queues for more than T (Celery's own view), or it is idle
  (no job running or reserved), its queues hold ready messages, and it has received nothing
  and been busy with nothing for more than T (it believes it consumes, but nothing arrives);
- **ok** otherwise, and during a warm shutdown (SIGTERM: it stops consuming on purpose while it
  finishes its jobs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import redis

from storage import keys
from storage.eta import heartbeat as eta_heartbeat

STALE_AFTER_INTERVALS = 3
"""A worker silent (or not consuming) for this many of its heartbeat intervals is stale
(stalled)."""

RECORD_TTL_INTERVALS = 30
"""A record outlives its last heartbeat by this many intervals (5 min at the default 10 s), so a
dead worker shows as stale for a while before it disappears from `dreamq workers`."""

INDEX_MAX_AGE = 24 * 3600.0
"""Index entries older than this are dropped by every heartbeat, whatever their record."""

OK, STALE, STALLED = "ok", "stale", "stalled"

# KEYS: models hash, expiry zset, busy notes. ARGV: now. Drops every models entry (and its busy
# note) whose deadline passed (or that has none), atomically with respect to the control loops
# that write both.
_PRUNE_MODELS = """
local now = tonumber(ARGV[1])
local removed = {}
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  local deadline = redis.call('ZSCORE', KEYS[2], name)
  if (not deadline) or tonumber(deadline) < now then
    redis.call('HDEL', KEYS[1], name)
    redis.call('HDEL', KEYS[3], name)
    table.insert(removed, name)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
return removed
"""


def process_name(host: str, pid: int) -> str:
    """The `dreamq:workers:models` field of one pool process."""
    return f"{host}:{pid}"


@dataclass
class WorkerRecord:
    """What a worker's main process says about itself on every heartbeat."""

    name: str
    """Celery node name, unique per worker process: `<role>-<main pid>@<host>`."""
    role: str
    """`generate` (`dreamq worker`) or `webhooks` (`dreamq dispatcher`)."""
    host: str
    pid: int
    """The main process."""
    queues: list[str]
    """The queues it was started to consume."""
    concurrency: int
    pool_pids: list[int]
    """Its prefork pool processes (none for the dispatcher's threads)."""
    started_at: float
    heartbeat_at: float
    heartbeat_seconds: float
    """Its interval: it judges this worker's staleness, whatever the reader's settings."""
    last_received_at: float | None = None
    """When the consumer last received a message from the broker (None: never)."""
    busy_at: float | None = None
    """The last heartbeat at which a job was running or reserved (None: never)."""
    jobs: list[int] = field(default_factory=list)
    """Ids of the jobs running now."""
    reserved: int = 0
    """Messages received and waiting for a free pool process."""
    connected: bool = False
    """Celery's view: the consumer holds a broker connection."""
    consuming: list[str] = field(default_factory=list)
    """Celery's view: the queues its consumer is subscribed to now."""
    consuming_at: float | None = None
    """The last heartbeat at which it was connected and consuming all of `queues`."""
    stopping: bool = False
    """In a warm shutdown: it stopped consuming on purpose and finishes its jobs."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerRecord:
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in data.items() if name in known})

    @property
    def stale_after(self) -> float:
        return STALE_AFTER_INTERVALS * self.heartbeat_seconds


def assess(record: WorkerRecord, now: float, depth: int | None) -> tuple[str, str]:
    """(state, reason) of a worker at `now`; `depth` is the ready messages in its queues (None:
    unknown, e.g. the broker did not answer: then only what the record says is judged)."""
    limit = record.stale_after
    heard = now - record.heartbeat_at
    if heard > limit:
        return STALE, f"no heartbeat for {heard:.0f} s (limit {limit:g} s)"
    if record.stopping:
        return OK, "shutting down: takes no new job, finishes the running ones"
    consuming_at = record.consuming_at if record.consuming_at is not None else record.started_at
    if now - consuming_at > limit:
        missing = sorted(set(record.queues) - set(record.consuming))
        what = "no broker connection" if not record.connected else f"not consuming {missing}"
        return STALLED, f"{what} for {now - consuming_at:.0f} s (limit {limit:g} s)"
    idle = not record.jobs and not record.reserved
    if idle and depth:
        activity = max(record.started_at, record.last_received_at or 0, record.busy_at or 0)
        quiet = now - activity
        if quiet > limit:
            return STALLED, (
                f"idle with {depth} message(s) ready in {record.queues}, nothing received for "
                f"{quiet:.0f} s (limit {limit:g} s)"
            )
    return OK, ""


@dataclass(frozen=True)
class WorkerStatus:
    record: WorkerRecord
    state: str
    reason: str
    process_models: dict[int, list[str]]
    """Pool pid -> the models that process holds (live entries only)."""
    queue_depth: int | None
    now: float

    @property
    def models(self) -> list[str]:
        return sorted({model for held in self.process_models.values() for model in held})

    @property
    def heartbeat_age(self) -> float:
        return max(0.0, self.now - self.record.heartbeat_at)

    @property
    def received_age(self) -> float | None:
        at = self.record.last_received_at
        return None if at is None else max(0.0, self.now - at)

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.record),
            "state": self.state,
            "reason": self.reason,
            "heartbeat_age": round(self.heartbeat_age, 3),
            "last_received_age": None if self.received_age is None else round(self.received_age, 3),
            "models": self.models,
            "process_models": {str(pid): held for pid, held in self.process_models.items()},
            "queue_depth": self.queue_depth,
        }


class WorkerStore:
    """Reads and writes worker records and the pool processes' model lists (sync client)."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self._prune = client.register_script(_PRUNE_MODELS)

    # -- the worker side -------------------------------------------------------------------

    def beat(self, record: WorkerRecord, *, serving: bool, gone_pids: Iterable[int] = ()) -> None:
        """Write `record` (its expiry pushed forward), count the worker for the ETA when it is a
        generation worker consuming (`serving`), and drop the model lists of its pool processes
        that are gone and of every process past its deadline."""
        now = record.heartbeat_at
        ttl = max(1, round(RECORD_TTL_INTERVALS * record.heartbeat_seconds))
        pipe = self._r.pipeline(transaction=False)
        pipe.set(keys.worker(record.name), record.to_json(), ex=ttl)
        pipe.zadd(keys.WORKER_INDEX, {record.name: now})
        pipe.zremrangebyscore(keys.WORKER_INDEX, "-inf", now - INDEX_MAX_AGE)
        gone = [process_name(record.host, pid) for pid in gone_pids]
        if gone:
            pipe.hdel(keys.WORKER_MODELS, *gone)
            pipe.hdel(keys.WORKER_BUSY, *gone)
            pipe.zrem(keys.WORKER_MODELS_EXPIRY, *gone)
        pipe.execute()
        if serving:
            eta_heartbeat(self._r, record.name, now)
        self.prune_models(now)

    def remove(self, name: str) -> None:
        """A worker that stops cleanly leaves no record behind (and leaves the ETA's count)."""
        pipe = self._r.pipeline(transaction=False)
        pipe.delete(keys.worker(name))
        pipe.zrem(keys.WORKER_INDEX, name)
        pipe.zrem(keys.WORKERS, name)
        pipe.execute()

    # -- pool processes' model lists ---------------------------------------------------------

    def publish_models(self, name: str, models: list[str], *, until: float) -> None:
        """One pool process's models, alive until `until` unless published again."""
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(keys.WORKER_MODELS, name, json.dumps(models))
        pipe.zadd(keys.WORKER_MODELS_EXPIRY, {name: until})
        pipe.execute()

    def forget_models(self, *names: str) -> None:
        if not names:
            return
        pipe = self._r.pipeline(transaction=True)
        pipe.hdel(keys.WORKER_MODELS, *names)
        pipe.hdel(keys.WORKER_BUSY, *names)
        pipe.zrem(keys.WORKER_MODELS_EXPIRY, *names)
        pipe.execute()

    def prune_models(self, now: float) -> list[str]:
        """Drop the model lists past their deadline (or with none); the names dropped."""
        names = [keys.WORKER_MODELS, keys.WORKER_MODELS_EXPIRY, keys.WORKER_BUSY]
        removed = self._prune(keys=names, args=[now])
        return [_text(name) for name in removed]

    def process_models(self, now: float) -> dict[str, list[str]]:
        """Live pool processes' model lists, by `<host>:<pid>`."""
        self.prune_models(now)
        raw = self._r.hgetall(keys.WORKER_MODELS)
        return {_text(name): json.loads(value) for name, value in raw.items()}

    # -- the reader side ---------------------------------------------------------------------

    def records(self) -> list[WorkerRecord]:
        """Every worker with a record, newest heartbeat first; index entries whose record has
        expired are dropped."""
        names: list[str] = [_text(name) for name in self._r.zrevrange(keys.WORKER_INDEX, 0, -1)]
        if not names:
            return []
        raws = self._r.mget([keys.worker(name) for name in names])
        found, expired = [], []
        for name, raw in zip(names, raws, strict=True):
            if raw is None:
                expired.append(name)
            else:
                found.append(WorkerRecord.from_json(raw))
        if expired:
            self._r.zrem(keys.WORKER_INDEX, *expired)
        return found

    def statuses(
        self,
        depths: Callable[[list[str]], dict[str, int | None]],
        now: float | None = None,
    ) -> list[WorkerStatus]:
        """Every worker's state; `depths` gives the ready messages of the queues named (the
        broker's answer, see `queue_depths`)."""
        moment = time.time() if now is None else now
        records = self.records()
        held = self.process_models(moment)
        queues = sorted({queue for record in records for queue in record.queues})
        depth_of = depths(queues) if queues else {}
        answer = []
        for record in records:
            counts = [depth_of.get(queue) for queue in record.queues]
            depth = None if any(c is None for c in counts) else sum(c or 0 for c in counts)
            models = {
                pid: held[process_name(record.host, pid)]
                for pid in record.pool_pids
                if process_name(record.host, pid) in held
            }
            state, reason = assess(record, moment, depth)
            answer.append(WorkerStatus(record, state, reason, models, depth, moment))
        return answer


def find(statuses: list[WorkerStatus], target: str) -> WorkerStatus | None:
    """The worker named `target`, or for `<role>@<host>` the newest worker of that role on that
    host (what a liveness probe inside a container can name: `generate@$(hostname)`)."""
    for status in statuses:
        if status.record.name == target:
            return status
    role, at, host = target.partition("@")
    if not at:
        return None
    matching = [
        s for s in statuses if s.record.role == role and s.record.name.rpartition("@")[2] == host
    ]
    return max(matching, key=lambda s: s.record.started_at, default=None)


def queue_depths(broker_url: str, queues: list[str], timeout: float = 5.0) -> dict[str, int | None]:
    """Ready messages per queue, from the broker (Redis or AMQP): a passive declare. A queue the
    broker does not know holds nothing (Redis drops an empty list); None when the broker cannot
    be asked."""
    from kombu import Connection  # the broker client: only the status command needs it here
    from kombu.exceptions import ChannelError

    depths: dict[str, int | None] = dict.fromkeys(queues)
    # Best effort: a status without depths still judges heartbeats and consumers.
    with suppress(Exception), Connection(broker_url, connect_timeout=timeout) as connection:
        connection.ensure_connection(max_retries=1)
        for queue in queues:
            channel = connection.channel()
            try:
                depths[queue] = int(channel.queue_declare(queue, passive=True).message_count)
            except ChannelError:  # NOT_FOUND; AMQP closes the channel: one per queue
                depths[queue] = 0
            finally:
                with suppress(Exception):  # an AMQP channel the broker closed already
                    channel.close()
    return depths


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value
