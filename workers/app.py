"""The Celery worker application: two thin tasks over the runner and the dispatcher.

`dreamq worker` consumes the generation queue (one process per GPU, prefork); `dreamq dispatcher`
consumes the webhook queue on CPU. Heavy things (Redis and S3 clients, the pipeline cache) are
built once per pool process, after fork, in `worker_process_init`: CUDA must never be initialised
in the parent.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from celery.signals import (
    setup_logging,
    task_received,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from celery.utils.nodenames import worker_direct

from dreamq import lanes
from dreamq.queue import GENERATE_TASK, WEBHOOK_TASK, CeleryPublisher, make_celery
from dreamq.registry import Registry, load_registry
from dreamq.settings import Settings
from storage.claims import ClaimStore
from storage.eta import DurationRecorder
from storage.jobs import JobStore
from storage.layout import TEMP_LIFETIME_SECONDS, TEMP_PREFIX
from storage.objects import ObjectStore, S3ObjectStore, open_object_store
from workers.liveness import Heartbeat
from workers.metrics import MetricsServer, WorkerMetrics
from workers.supervision import JobSupervisor, supervised_request

log = logging.getLogger("dreamq.worker")


@dataclass
class _ProcessParts:
    pid: int
    runner: Any
    dispatcher: Any


class WorkerRuntime:
    """What one pool process needs, built lazily once per process (and rebuilt after a fork)."""

    def __init__(self, settings: Settings, app: Celery, role: str) -> None:
        self.settings = settings
        self.app = app
        self.role = role
        self._parts: _ProcessParts | None = None
        self._lock = threading.Lock()

    def parts(self) -> _ProcessParts:
        with self._lock:
            if self._parts is None or self._parts.pid != os.getpid():
                self._parts = self._build()
            return self._parts

    def _build(self) -> _ProcessParts:
        settings = self.settings
        client = redis.Redis.from_url(settings.redis_url)
        jobs = JobStore(
            client,
            ttl_seconds=settings.job_ttl_seconds,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
        )
        publisher = CeleryPublisher(self.app, settings)
        # Per process, after the fork: in a worker, its values go to this process's own files.
        metrics = WorkerMetrics()
        runner = dispatcher = None
        if self.role == "generate":
            runner = self._build_runner(client, jobs, publisher, metrics)
        else:
            from workers.webhooks import celery_schedule, dispatcher_from_settings

            schedule = celery_schedule(self.app, WEBHOOK_TASK, settings.webhook_queue, time.time)
            dispatcher = dispatcher_from_settings(
                settings, client, jobs, schedule, on_attempt=metrics.webhook_attempt
            )
        return _ProcessParts(pid=os.getpid(), runner=runner, dispatcher=dispatcher)

    def _build_runner(
        self, client: redis.Redis, jobs: JobStore, publisher: Any, metrics: WorkerMetrics
    ) -> Any:
        # Imported here: the dispatcher never loads torch.
        import torch

        from workers.control import WorkerControl
        from workers.finisher import ThreadFinisher
        from workers.generate import Generator
        from workers.helpers import HelperModels
        from workers.inputs import InputLoader
        from workers.models import PipelineCache
        from workers.runner import JobRunner, Routing

        settings = self.settings
        registry = _registry(settings)
        objects = open_object_store(settings)
        _expire_temp_outputs(objects)
        durations = DurationRecorder(client)

        def record_load(model_id: str, seconds: float) -> None:
            metrics.model_loaded(model_id, seconds)
            try:
                durations.record_load(model_id, seconds)
            except redis.RedisError:  # a statistic: never worth failing the job that loaded
                log.warning("model %s: could not record its load time", model_id)

        cache = PipelineCache(
            registry,
            device=settings.device,
            dtype=settings.dtype,
            idle_seconds=settings.model_idle_seconds,
            on_load=record_load,
            on_lookup=metrics.cache_lookup,
        )
        control = WorkerControl(
            client,
            cache,
            name=f"{socket.gethostname()}:{os.getpid()}",
            idle_seconds=settings.model_idle_seconds,
            refresh_seconds=settings.heartbeat_seconds,
        )
        control.start()
        # Each job's encoding, upload and terminal transition run here, beside the next job's
        # compute; a tail stuck past the soft time limit is abandoned (workers/finisher.py).
        finisher = ThreadFinisher(deadline=settings.soft_time_limit)

        def stop(**_: Any) -> None:
            # Warm shutdown: the last job's tail is stored before the process exits.
            finisher.close(timeout=settings.soft_time_limit)
            control.stop()

        # A pool process does not run atexit handlers: Celery ends it with os._exit.
        worker_process_shutdown.connect(stop, weak=False)
        loader = InputLoader.from_settings(settings, objects)  # one HTTP client per process

        def after_job() -> None:
            control.job_finished()
            metrics.sample_gpu_memory(torch, cache.device)

        def fetch_image(ref: Any, field: str) -> Any:
            return loader.load(ref, field=field)

        routing = Routing(
            claims=ClaimStore(client, jobs),
            warm=cache.loaded_ids,
            process=control.name,
            batch_images=settings.batch_size,
            hand_off=functools.partial(_hand_off, self.app),
        )
        return JobRunner(
            jobs=jobs,
            objects=objects,
            generator=Generator(cache, registry),
            helpers=HelperModels(registry, device=cache.device, dtype=cache.dtype),
            fetch_image=fetch_image,
            durations=durations,
            publisher=publisher,
            before_job=control.job_started,
            after_job=after_job,
            on_finished=metrics.job_finished,
            finisher=finisher,
            overlap_inputs=True,
            routing=routing,
        )


def _hand_off(app: Celery, job_id: int, level: int, node: str) -> None:
    """A message for the job to Celery node `node` alone (its worker-direct queue), marked as
    handed over (workers/routing.py)."""
    priority = {"priority": lanes.broker_priority(level)} if level else {}
    app.send_task(
        GENERATE_TASK,
        args=[job_id],
        kwargs={"routed": True},
        queue=worker_direct(node),
        **priority,
    )


def _expire_temp_outputs(objects: ObjectStore) -> None:
    """`temp: "yes"` outputs live a day: a lifecycle rule on the bucket deletes them."""
    if isinstance(objects, S3ObjectStore):
        try:
            objects.expire_prefix(TEMP_PREFIX, days=TEMP_LIFETIME_SECONDS // 86400)
        except Exception:
            log.warning(
                "could not add the lifecycle rule that expires %s* in bucket %s; add it by hand",
                TEMP_PREFIX,
                objects.bucket,
                exc_info=True,
            )


def _registry(settings: Settings) -> Registry:
    if settings.models_file is None:
        raise RuntimeError("DREAMQ_MODELS_FILE is not set: the worker needs the model registry")
    return load_registry(settings.models_file)


def create_worker_app(settings: Settings, role: str) -> Celery:
    """A Celery app whose tasks run generation jobs (role 'generate') or webhooks ('webhooks')."""
    if role not in ("generate", "webhooks"):
        raise ValueError(f"unknown worker role {role!r}")
    app = make_celery(settings)
    runtime = WorkerRuntime(settings, app, role)
    # dreamq configured logging (DREAMQ_LOG_FORMAT) before Celery starts: a receiver of this
    # signal keeps Celery from adding handlers and formats of its own.
    setup_logging.connect(_keep_logging, weak=False)
    server = _metrics_server(settings)
    # The main process frees the lease of a pool process it lost, fails a job it killed, and
    # runs again a job its dead process was still storing (workers/supervision.py).
    supervisor = JobSupervisor(settings, app)

    if role == "generate":
        # Each worker node also consumes a queue of its own: a node that holds a job's model
        # warm is handed that job's message there (workers/routing.py).
        app.conf.worker_direct = True

    @app.task(name=GENERATE_TASK, bind=True, Request=supervised_request(supervisor))
    def generate(self: Any, job_id: int, routed: bool = False) -> None:
        node = str(self.request.hostname or "")
        look_again = runtime.parts().runner.run(int(job_id), node=node, routed=bool(routed))
        if look_again is not None:  # a duplicate delivery: ask again once the lease expired
            raise self.retry(countdown=look_again, max_retries=None)

    @app.task(name=WEBHOOK_TASK)
    def deliver_webhook(job_id: int, attempt: int = 1, due_at: float | None = None) -> None:
        runtime.parts().dispatcher.handle(int(job_id), int(attempt), due_at)

    def on_process_init(**_: Any) -> None:
        runtime.parts()
        # Celery says "ready" once the consumer runs, not once the pool processes have built
        # their parts (torch imported, clients up): only from here does a job start at once.
        log.info("pool process ready (%s)", role)

    # weak=False: the handlers are closures that would otherwise be collected at once.
    worker_process_init.connect(on_process_init, weak=False)

    # Every worker writes its liveness record (workers/liveness.py) from the main process; only
    # generation workers that consume count towards the ETA's "workers serving the queue".
    def pool_gone(pids: list[int]) -> None:
        if role == "generate":
            supervisor.processes_gone(pids)
        if server is not None:
            server.process_gone(pids)

    beat = Heartbeat(
        redis.Redis.from_url(settings.redis_url),
        role=role,
        interval=settings.heartbeat_seconds,
        on_pool_gone=pool_gone,
    )
    worker_ready.connect(lambda sender, **_: beat.start(sender), weak=False)
    task_received.connect(beat.received, weak=False)
    worker_shutting_down.connect(beat.stopping, weak=False)
    worker_shutdown.connect(beat.stop, weak=False)
    if role == "webhooks":
        _run_reconciler(settings, app)
    return app


def _keep_logging(**_: Any) -> None:
    """Celery's `setup_logging`: the process's logging is dreamq's (dreamq/logs.py)."""


def _metrics_server(settings: Settings) -> MetricsServer | None:
    """DREAMQ_METRICS_PORT from the main process, once Celery starts a worker (`worker_init`,
    before the pool forks); nothing when it is 0 or when the app is only built (tests)."""
    if not settings.metrics_port:
        return None
    server = MetricsServer(settings.metrics_port)

    def start(**_: Any) -> None:
        server.prepare()
        server.start()
        atexit.register(server.stop)

    worker_init.connect(start, weak=False)
    worker_shutdown.connect(lambda **_: server.stop(), weak=False)
    return server


def _run_reconciler(settings: Settings, app: Celery) -> None:
    """Every dispatcher runs the reconciler's loop in its main process; the fleet lock lets one
    of them work at a time."""
    from workers.reconciler import ReconcilerThread, fleet_lock, from_settings

    thread = ReconcilerThread(
        from_settings(settings, app), fleet_lock(settings), settings.reconcile_seconds
    )
    worker_ready.connect(lambda **_: thread.start(), weak=False)
    worker_shutdown.connect(lambda **_: thread.stop(), weak=False)
