"""The app factory: `create_app(settings, ...)` wires services onto app.state.

Everything is built here without I/O (clients connect on first use), so tests can build the app
with fakes, and `dreamq api` with real services from the settings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from api import errors
from api.bodysize import BodySizeLimit
from api.fastlane import FastLane, lanes_of
from api.metrics import ApiMetrics, FleetReader
from api.readiness import Readiness, broker_client, is_redis_url
from api.redisclient import waiting_client
from api.routes import router
from api.service import DreamboothService
from dreamq import __version__, logs
from dreamq.broker import transport_for
from dreamq.queue import (
    BROKER_SOCKET_OPTIONS,
    AsyncPublisher,
    CeleryPublisher,
    RedisPublisher,
    ThreadedPublisher,
    make_celery,
)
from dreamq.registry import Registry, load_registry
from dreamq.settings import Settings
from storage.apikeys import AsyncApiKeyStore
from storage.jobs import AsyncJobStore
from storage.layout import TEMP_LIFETIME_SECONDS, TEMP_PREFIX, input_key
from storage.limits import RateLimiter
from storage.objects import LocalDirObjectStore, ObjectStore, open_object_store
from storage.wire import Multiplexed, RedisPyWire

log = logging.getLogger("dreamq.api")


@dataclass
class Overrides:
    """Parts a test may replace; anything left None is built from the settings."""

    redis_client: aioredis.Redis | None = None
    registry: Registry | None = None
    objects: ObjectStore | None = None
    publisher: AsyncPublisher | None = None
    """Else the direct Redis publisher (a Redis broker) or kombu in a thread (RabbitMQ)."""
    limiter_client: aioredis.Redis | None = None
    """The rate limiter's Redis; else DREAMQ_RATE_LIMIT_REDIS_URL's, else the job Redis."""
    limiter_clock: Callable[[], float] | None = None
    """The rate limiter's clock; else Redis's own."""
    fast_lane: bool = True
    """False: FastAPI serves every request (tests compare the two; api/fastlane.py)."""


def create_app(settings: Settings, overrides: Overrides | None = None) -> FastAPI:
    parts = overrides or Overrides()
    client = parts.redis_client or waiting_client(settings.redis_url)
    registry = parts.registry or _registry(settings)
    objects = parts.objects or open_object_store(settings)
    publisher, publish_client = (
        (parts.publisher, None) if parts.publisher else _publisher(settings, client)
    )
    limiter_client = parts.limiter_client or _limiter_client(settings) or client
    broker_url = settings.effective_broker_url
    broker = broker_client(settings.redis_url, broker_url)
    # The hot path's commands: one multiplexed connection (storage/wire.py), or the given
    # client's (a test's fakeredis).
    wire = (
        RedisPyWire(parts.redis_client) if parts.redis_client else Multiplexed(settings.redis_url)
    )
    jobs = AsyncJobStore(client, ttl_seconds=settings.job_ttl_seconds, wire=wire)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()
        if isinstance(wire, Multiplexed):
            await wire.aclose()
        if limiter_client is not client:
            await limiter_client.aclose()
        if broker is not None:
            await broker.aclose()
        if publish_client is not None:
            await publish_client.aclose()

    app = FastAPI(
        title="dreamq",
        version=__version__,
        summary="Self-hosted Dreambooth API V4: text to image through a distributed job queue.",
        lifespan=lifespan,
    )
    if parts.fast_lane:
        # Added first, so inside the body cap and the metrics: they see its requests too.
        app.add_middleware(FastLane, lanes=lanes_of(router))
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.body_limit, legacy_http_200=settings.legacy_http_200
    )
    app.state.settings = settings
    app.state.publisher = publisher  # which one the settings chose: tests look
    app.state.service = DreamboothService(
        settings=settings,
        redis_client=client,
        wire=wire,
        jobs=jobs,
        api_keys=AsyncApiKeyStore(wire),
        registry=registry,
        objects=objects,
        publisher=publisher,
        limiter=RateLimiter(
            limiter_client, when_down=settings.rate_limit_when_down, clock=parts.limiter_clock
        ),
    )
    errors.install(app, legacy_http_200=settings.legacy_http_200)
    app.include_router(router)
    same_redis = broker_url == settings.redis_url
    fleet = FleetReader(
        client,
        jobs,
        [settings.generate_queue, settings.webhook_queue],
        redis_broker=is_redis_url(broker_url),
        broker=broker,
    )
    # Added last, so outermost: it sees every answer, the body cap's 413 included.
    ApiMetrics(fleet).install(app)
    readiness = Readiness(client, broker_url, broker=broker, same_redis=same_redis)

    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get(
        "/ready",
        tags=["operations"],
        responses={503: {"description": "Redis or the broker is down (named in the body)"}},
    )
    async def ready() -> JSONResponse:
        """Readiness: Redis and the broker answer. 503 names what is down."""
        found = await readiness.check()
        body: dict[str, str] = {name: "up" if up else "down" for name, up in found.items()}
        if all(found.values()):
            return JSONResponse({"status": "ok", **body})
        return JSONResponse({"status": "unavailable", **body}, status_code=503)

    if isinstance(objects, LocalDirObjectStore):
        local = objects

        @app.get("/files/{key:path}", tags=["outputs"], include_in_schema=False)
        async def files(key: str) -> FileResponse:
            """Outputs of the local-directory store (the embedded default)."""
            # Inputs are the clients' own uploads, stored for the worker, never served back.
            if key.startswith(INPUTS_PREFIX):
                raise HTTPException(404)
            try:
                path = local.path_for(key)
            except ValueError:
                raise HTTPException(404) from None
            if not path.is_file() or _expired(key, path):
                raise HTTPException(404)
            return FileResponse(path)

    return app


INPUTS_PREFIX = input_key("x", "y").rsplit("/", 1)[0] + "/"


def _expired(key: str, path: Path) -> bool:
    """The local store's stand-in for the bucket lifecycle rule of `temp: "yes"` outputs."""
    if not key.startswith(TEMP_PREFIX):
        return False
    return time.time() - path.stat().st_mtime > TEMP_LIFETIME_SECONDS


def _publisher(
    settings: Settings, client: aioredis.Redis
) -> tuple[AsyncPublisher, aioredis.Redis | None]:
    """The API's publisher, and the broker client it opened (to close at shutdown) if any.

    A Redis broker gets the direct `RedisPublisher`: over the API's own client when the broker
    is the job Redis (whose create step then pushes the message with the record), else over a
    client of its own with kombu's socket timeouts, so a broker that vanished fails a request in
    seconds instead of hanging it. Any other broker (RabbitMQ)
    gets kombu's `send_task`, in a thread."""
    url = settings.effective_broker_url
    if transport_for(url) is None:
        return ThreadedPublisher(CeleryPublisher(make_celery(settings), settings)), None
    if url == settings.redis_url:
        return RedisPublisher(client, settings.generate_queue, job_redis=True), None
    broker = waiting_client(url, **BROKER_SOCKET_OPTIONS)
    return RedisPublisher(broker, settings.generate_queue), broker


def _limiter_client(settings: Settings) -> aioredis.Redis | None:
    if settings.rate_limit_redis_url is None:
        return None
    # Every request waits on the limiter: a Redis that went away must cost a request about a
    # second, not the default 5 s timeouts times the default retries.
    return aioredis.Redis.from_url(
        settings.rate_limit_redis_url,
        socket_connect_timeout=1.0,
        socket_timeout=1.0,
        retry=Retry(NoBackoff(), retries=1),
    )


def _registry(settings: Settings) -> Registry:
    if settings.models_file is None:
        raise RuntimeError("DREAMQ_MODELS_FILE is not set: the API needs the model registry")
    return load_registry(settings.models_file)


def app_from_environment() -> FastAPI:
    """uvicorn factory for `dreamq api`: settings from the environment, read at startup."""
    settings = Settings()
    # Here, not only in `dreamq api`: uvicorn configures its loggers before it calls this
    # factory (in each of its --workers processes), and DREAMQ_LOG_FORMAT must win.
    logs.configure(settings.log_level, settings.log_format)
    return create_app(settings)
