"""Priority lanes and fair sharing: the priority level each job waits at.

Every plan has a lane (`priority` in DREAMQ_PLANS: high, normal or low). A key that already has
DREAMQ_FAIR_BACKLOG unfinished jobs queues its next ones one level lower, behind the fresh work
of every key of its lane: a key that floods the queue delays itself, and another key's job waits
at most for the flooder's first DREAMQ_FAIR_BACKLOG jobs, not for all of them. A high key's
overflow competes with the normal keys' fresh work as an equal, never behind it.

Levels are kombu's Redis message priorities (workers serve the lists of a queue in priority
order, 0 first; default `priority_steps`), so the order survives in the broker itself: no
scheduler process, nothing to lose when an API process dies. Within a level, first come first
served. The job store keeps the queue in the same order (`keys.QUEUED_JOBS`), which is what the
ETA and the queue position read.
"""

from __future__ import annotations

from typing import Literal

Lane = Literal["high", "normal", "low"]
LANES: tuple[Lane, ...] = ("high", "normal", "low")

BROKER_PRIORITIES = (0, 3, 6, 9)
"""kombu's Redis `priority_steps` (its default): the message priority of each level. A worker's
BRPOP names the lists in this order, so a lower number is served first."""

PRIORITY_SEPARATOR = "\x06\x16"
"""kombu's Redis `Channel.sep`: a queue's list for priority n > 0 is `queue + sep + str(n)`; it
also joins the fields of a queue's binding."""

LEVELS = len(BROKER_PRIORITIES)


def level(lane: Lane, unfinished: int, fair_backlog: int) -> int:
    """The level of a key's next job: its lane's, one lower once the key has `fair_backlog`
    unfinished jobs (0: no fair sharing)."""
    base = LANES.index(lane)
    overflow = fair_backlog > 0 and unfinished >= fair_backlog
    return base + 1 if overflow else base


def broker_priority(job_level: int) -> int:
    return BROKER_PRIORITIES[job_level]


def list_name(queue: str, job_level: int) -> str:
    """The Redis list kombu keeps the queue's messages of this level in."""
    priority = broker_priority(job_level)
    return queue if priority == 0 else f"{queue}{PRIORITY_SEPARATOR}{priority}"
