"""The two references the admission figure is measured beside, served by uvicorn like dreamq.

- `naive_app`: the design dreamq replaces: a FastAPI route that publishes one Celery task with
  `send_task` (a plain `def` route, which FastAPI runs in its thread pool, as most guides write
  it) and answers a task id. No key check, no job record, no ETA.
- `floor_app`: the least a Redis-backed admission can do: one `async` route, one Redis pipeline
  (an id and a list push), no validation. Nothing real beats it on the same server and Redis.

Both read the Redis URL from BENCH_REDIS_URL (set by the suite) and take the body dreamq takes.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from fastapi import FastAPI, Request
from fastapi.responses import Response

PATH = "/api/v4/dreambooth"


def naive_app() -> FastAPI:
    celery = Celery("naive", broker=os.environ["BENCH_REDIS_URL"], set_as_current=False)
    celery.conf.update(task_serializer="json", task_ignore_result=True)
    app = FastAPI()

    @app.post(PATH)
    def submit(body: dict[str, Any]) -> dict[str, Any]:
        task_id = str(uuid.uuid4())
        # Nobody consumes this queue: the figure is the publish, not the work.
        celery.send_task("bench.generate", args=[body], queue="bench-naive", task_id=task_id)
        return {"status": "processing", "id": task_id}

    return app


def floor_app() -> FastAPI:
    client = aioredis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    app = FastAPI()

    @app.post(PATH)
    async def submit(request: Request) -> Response:
        body = await request.body()
        pipe = client.pipeline(transaction=False)
        pipe.incr("bench:floor:id")
        pipe.lpush("bench:floor:queue", body)
        job_id, _ = await pipe.execute()
        answer = json.dumps({"status": "processing", "id": job_id})
        return Response(answer, media_type="application/json")

    return app
