"""Submission and fetch: the logic behind the routes, callable without HTTP."""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio.to_thread
import redis.asyncio as aioredis

from dreamq.contract import (
    FetchResponse,
    ProcessingResponse,
    Txt2ImgRequest,
    job_body,
)
from dreamq.errors import (
    InvalidApiKey,
    JobNotFound,
    ModelNotFound,
    ServiceUnavailable,
    ValidationFailed,
)
from dreamq.queue import Publisher
from dreamq.registry import Registry
from dreamq.settings import Settings
from storage import eta
from storage.apikeys import AsyncApiKeyStore, KeyInfo
from storage.jobs import AsyncJobStore, NewJob
from storage.layout import output_key
from storage.objects import ObjectStore

log = logging.getLogger("dreamq.api")

DEFAULTS = {"width": 512, "height": 512, "samples": 1, "steps": 30, "guidance_scale": 7.5}


class DreamboothService:
    def __init__(
        self,
        *,
        settings: Settings,
        redis_client: aioredis.Redis,
        jobs: AsyncJobStore,
        api_keys: AsyncApiKeyStore,
        registry: Registry,
        objects: ObjectStore,
        publisher: Publisher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._redis = redis_client
        self._jobs = jobs
        self._keys = api_keys
        self._registry = registry
        self._objects = objects
        self._publisher = publisher
        self._clock = clock

    async def authenticate(self, key: str | None) -> KeyInfo:
        info = await self._keys.lookup(key)
        if info is None:
            raise InvalidApiKey()
        return info

    async def submit_txt2img(self, request: Txt2ImgRequest) -> ProcessingResponse:
        owner = await self.authenticate(request.key)
        assert request.model_id is not None and request.prompt is not None  # validated
        entry = self._registry.model(request.model_id)
        if entry is None:
            raise ModelNotFound()
        # Refused here, by name, rather than failed later on a GPU.
        if entry.kind != "image":
            raise ValidationFailed({"model_id": [f"The model is a {entry.kind} model."]})
        if entry.family != "sd15":
            raise ValidationFailed(
                {"model_id": [f"{entry.family} models are not served by this deployment yet."]}
            )
        params = self._txt2img_params(request)
        file_prefix = str(uuid.uuid4())
        links = [self._objects.url(output_key(file_prefix, i)) for i in range(params["samples"])]
        meta = _meta(request.model_id, params, file_prefix)
        units = eta.work_units(
            params["width"], params["height"], params["steps"], params["samples"]
        )
        inputs = await eta.read_inputs(self._redis, request.model_id, self._clock())
        run_seconds = eta.predicted_run_seconds(inputs, units, self._settings.default_eta_seconds)
        eta_seconds = eta.estimate(inputs, run_seconds, self._settings.default_eta_seconds)
        job_id = await self._jobs.create(
            NewJob(
                owner=owner.id,
                model_id=request.model_id,
                kind="txt2img",
                params=params,
                meta=meta,
                file_prefix=file_prefix,
                future_links=links,
                predicted_seconds=run_seconds,
                eta_seconds=eta_seconds,
                webhook=request.webhook,
                track_id=request.track_id,
            )
        )
        await self._publish(job_id)
        return ProcessingResponse(
            eta=eta_seconds,
            fetch_result=f"{self._settings.public_url}/api/v4/dreambooth/fetch/{job_id}",
            id=job_id,
            meta=meta,
            future_links=links,
        )

    async def fetch(self, key: str | None, job_id: int) -> FetchResponse:
        owner = await self.authenticate(key)
        job = await self._jobs.get(job_id)
        # Another key's job answers exactly like an unknown one: ids are sequential, so any
        # difference would let a key enumerate the others' traffic.
        if job is None or job.owner != owner.id:
            raise JobNotFound()
        return job_body(job, self._clock())

    async def _publish(self, job_id: int) -> None:
        try:
            await anyio.to_thread.run_sync(self._publisher.publish_job, job_id)
        except Exception:
            # The record exists; fail it so a fetch tells the truth instead of "processing" forever.
            log.exception("publishing job %s failed", job_id)
            await self._jobs.fail(job_id, "The queue is unavailable; the job was not started.")
            raise ServiceUnavailable("The queue is unavailable, try again later.") from None

    def _txt2img_params(self, request: Txt2ImgRequest) -> dict[str, Any]:
        steps = min(request.num_inference_steps or DEFAULTS["steps"], self._settings.max_steps)
        scheduler = request.scheduler
        algorithm = request.algorithm_type
        if algorithm is not None and scheduler is None:
            # An algorithm type names a DPMSolver variant; with no scheduler it selects that one.
            scheduler = "DPMSolverMultistepScheduler"
        return {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "width": request.width or DEFAULTS["width"],
            "height": request.height or DEFAULTS["height"],
            "samples": request.samples or DEFAULTS["samples"],
            "steps": steps,
            "guidance_scale": (
                request.guidance_scale
                if request.guidance_scale is not None
                else DEFAULTS["guidance_scale"]
            ),
            "seed": request.seed if request.seed is not None else secrets.randbelow(2**32),
            "scheduler": scheduler,
            "use_karras_sigmas": (
                request.use_karras_sigmas if request.use_karras_sigmas is not None else True
            ),
            "algorithm_type": algorithm,
        }


def _meta(model_id: str, params: dict[str, Any], file_prefix: str) -> dict[str, Any]:
    """The `meta` echo of spec §4.1: the effective values the job runs with."""
    return {
        "prompt": params["prompt"],
        "model_id": model_id,
        "negative_prompt": params["negative_prompt"],
        "scheduler": params["scheduler"],
        "W": params["width"],
        "H": params["height"],
        "guidance_scale": params["guidance_scale"],
        "seed": params["seed"],
        "steps": params["steps"],
        "n_samples": params["samples"],
        "use_karras_sigmas": "yes" if params["use_karras_sigmas"] else "no",
        "algorithm_type": params["algorithm_type"],
        "lora": None,
        "lora_strength": None,
        "embeddings": None,
        "vae": None,
        "clip_skip": 1,
        "safety_checker": "no",
        "upscale": "no",
        "temp": "no",
        "base64": "no",
        "file_prefix": file_prefix,
    }
