"""kombu's Redis transport, with one defect of kombu 5.7 worked around.

When a worker loses its Redis broker (a Redis restart, a network cut), Celery collects the broken
connection, which detaches the channel from its transport, and then closes it. Anything that
then reaches the broker through the old channel (closing it puts the messages the worker holds
back on their queue; a task that was running acks its message when it ends) needs the detached
connection's address, and raises AttributeError (`'NoneType' object has no attribute
'hostname'` / `'client'`). That escapes Celery's error handling and ends the worker
("Unrecoverable error"): a dispatcher holding webhook retries, or finishing one, died on every
Redis restart in the reliability tests.

The channel here remembers its broker's connection parameters, so the late ack and the restore
reach the broker like any other command: they succeed once it is back, and fail with a
connection error (which Celery handles) while it is not. A message whose ack is lost comes back
after the visibility timeout, and the job's state machine drops the duplicate.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _saved_connparams: dict[str, Any] | None = None

    def _connparams(self, asynchronous: bool = False) -> Any:
        detached = self.connection is None or self.connection.client is None
        if detached and not asynchronous and self._saved_connparams is not None:
            return dict(self._saved_connparams)
        params = super()._connparams(asynchronous=asynchronous)
        if not asynchronous:
            self._saved_connparams = dict(params)
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(url: str) -> type[Transport] | None:
    """The transport class for a broker URL: ours for plain Redis, kombu's choice otherwise."""
    return Transport if url.startswith(("redis://", "rediss://")) else None
