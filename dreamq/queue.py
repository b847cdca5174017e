"""The Celery side shared by the API (which publishes) and the workers (which consume).

Job state does not live in Celery: a message carries only a job id, results are ignored, and the
job record in Redis is the truth. Messages are acked late, after the job reached a terminal state,
so a worker that dies mid-job gives its message back to the broker.
"""

from __future__ import annotations

from typing import Protocol

from celery import Celery

from dreamq.broker import transport_for
from dreamq.settings import Settings

GENERATE_TASK = "dreamq.generate"
WEBHOOK_TASK = "dreamq.deliver_webhook"


def make_celery(settings: Settings) -> Celery:
    app = Celery("dreamq", broker=settings.effective_broker_url, set_as_current=False)
    transport = transport_for(settings.effective_broker_url)
    if transport is not None:  # kombu's Redis transport with a crash on reconnect worked around
        app.conf.broker_transport = transport
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message at a time per process: a GPU worker never sits on a job another could run.
        worker_prefetch_multiplier=1,
        task_routes={
            GENERATE_TASK: {"queue": settings.generate_queue},
            WEBHOOK_TASK: {"queue": settings.webhook_queue},
        },
        task_default_queue=settings.generate_queue,
        broker_connection_retry_on_startup=True,
        # A lost broker connection (R7) is re-established, not fatal. Celery retries after 2, 4,
        # 6 ... s, at most 30 s apart: a worker consumes again within 30 s of the broker's return.
        broker_connection_retry=True,
        # Retry for ever: the default gives up after 100 tries (about 50 min) and exits, dropping
        # the loaded models; a worker should outlast any broker outage.
        broker_connection_max_retries=None,
        # Keep running jobs through a connection loss (also Celery 6's default flips to True).
        # The job writes its outcome to the job record over its own Redis connection; its late
        # ack goes out after the reconnect, and if kombu put the message back meanwhile the copy
        # exits on the finished (or leased) record. Cancelling would throw away the GPU work and
        # cost an attempt, and on Redis the message would only return after the visibility timeout.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # The visibility timeout must agree everywhere kombu reads it (celery #5935).
        # Scan for expired messages on every 10 s tick, not every tenth: a lost worker's job comes
        # back within visibility_timeout + 10 s instead of + 100 s.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_throttle": 1,
            # Redis transport (AMQP ignores these). A broker gone without closing the connection
            # (failover, NAT or firewall drop) must fail a publish or an ack within 10 s instead
            # of blocking the API request or the worker's main loop for ever.
            "socket_timeout": 10.0,
            # Connecting to a vanished host fails in 10 s, not after the kernel's ~2 min of SYNs,
            # so the reconnect loop keeps its 30 s pace.
            "socket_connect_timeout": 10.0,
            # kombu drops a BRPOP connection whose answer is overdue (half-open) after
            # brpop_timeout (1 s) + 2 x this (21 s instead of 51 s with the default 25), and
            # redis-py pings a pooled connection idle this long before using it.
            "health_check_interval": 10,
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        visibility_timeout=settings.visibility_timeout,
        # Enforced by prefork only (celery #9203): `dreamq worker` runs prefork.
        task_time_limit=settings.job_time_limit,
        task_soft_time_limit=settings.soft_time_limit,
        # A pool process imports torch and builds its clients before it reports up; the default
        # 4 s made every replacement of a crashed process be killed in turn on a busy host.
        worker_proc_alive_timeout=60.0,
    )
    return app


class Publisher(Protocol):
    """Hands work to the broker. The job record is always written before a publish."""

    def publish_job(self, job_id: int) -> None: ...

    def publish_webhook(self, job_id: int) -> None: ...


class CeleryPublisher:
    def __init__(self, app: Celery, settings: Settings) -> None:
        self._app = app
        self._generate_queue = settings.generate_queue
        self._webhook_queue = settings.webhook_queue

    def publish_job(self, job_id: int) -> None:
        self._app.send_task(GENERATE_TASK, args=[job_id], queue=self._generate_queue)

    def publish_webhook(self, job_id: int) -> None:
        self._app.send_task(WEBHOOK_TASK, args=[job_id], queue=self._webhook_queue)


class RecordingPublisher:
    """In-memory twin for unit tests: remembers what would have been published."""

    def __init__(self) -> None:
        self.jobs: list[int] = []
        self.webhooks: list[int] = []
        self.fail_with: Exception | None = None

    def publish_job(self, job_id: int) -> None:
        if self.fail_with:
            raise self.fail_with
        self.jobs.append(job_id)

    def publish_webhook(self, job_id: int) -> None:
        self.webhooks.append(job_id)
