"""Submission and fetch: the logic behind the routes, callable without HTTP."""

from __future__ import annotations

import binascii
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio.to_thread
import redis.asyncio as aioredis

from dreamq import lanes, logs
from dreamq.capabilities import refusals
from dreamq.contract import (
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    FetchResponse,
    GenerationRequest,
    Img2ImgRequest,
    InpaintRequest,
    ModelListItem,
    ModelReloadResponse,
    ModelRequest,
    ProcessingResponse,
    Text2VideoRequest,
    Txt2ImgRequest,
    attribute,
    job_body,
)
from dreamq.errors import (
    FieldErrors,
    InvalidApiKey,
    JobNotFound,
    ModelNotFound,
    RateLimited,
    ServiceUnavailable,
    ValidationFailed,
)
from dreamq.jobparams import (
    DEFAULT_STRENGTH,
    SAFETY_ACTIONS,
    ImageInput,
    JobKind,
    JobParams,
    LoraChoice,
    OutputFormat,
)
from dreamq.outbound import Network, early_refusal, parse_cidrs
from dreamq.queue import AsyncPublisher
from dreamq.registry import Registry
from dreamq.settings import PlanLimits, Settings
from storage import eta, keys
from storage.apikeys import AsyncApiKeyStore, KeyInfo
from storage.jobs import (
    AsyncJobStore,
    BrokerMessage,
    JobStatus,
    NewJob,
    UnfinishedCapReached,
    record_of,
)
from storage.layout import input_key, output_key
from storage.limits import RateLimiter, fingerprint
from storage.objects import ObjectStore
from storage.wire import Wire

log = logging.getLogger("dreamq.api")

DEFAULTS: dict[str, int] = {"width": 512, "height": 512, "samples": 1, "steps": 30}
DEFAULT_GUIDANCE = 7.5


class DreamboothService:
    def __init__(
        self,
        *,
        settings: Settings,
        redis_client: aioredis.Redis,
        wire: Wire,
        jobs: AsyncJobStore,
        api_keys: AsyncApiKeyStore,
        registry: Registry,
        objects: ObjectStore,
        publisher: AsyncPublisher,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._outbound_allow = parse_cidrs(settings.outbound_allow_cidrs)
        self._limiter = limiter
        """None: no request rate and no duplicate filter (the plans' job caps still hold)."""
        self._unknown_plans: set[str] = set()
        self._redis = redis_client
        self._wire = wire
        """The hot path's reads (the ETA's inputs); `redis_client` for the rest."""
        self._jobs = jobs
        self._keys = api_keys
        self._registry = registry
        self._objects = objects
        self._publisher = publisher
        self._clock = clock

    @property
    def registry(self) -> Registry:
        return self._registry

    async def authenticate(self, key: str | None) -> KeyInfo:
        return self._authenticated(await self._keys.lookup(key))

    def _authenticated(self, info: KeyInfo | None) -> KeyInfo:
        if info is None:
            raise InvalidApiKey()
        logs.bind(key_name=info.name)  # the rest of this request's lines carry it
        return info

    async def submit(self, kind: JobKind, request: GenerationRequest) -> ProcessingResponse:
        """Accept a generation request of any kind: validate it against the registry, persist
        the job, publish it, and answer its id and ETA at once."""
        owner = await self.authenticate(request.key)
        # Counted before any work (registry checks, input decoding and storage) is done.
        plan = await self._admit(owner)
        assert request.model_id is not None and request.prompt is not None  # validated
        entry = self._registry.model(request.model_id)
        if entry is None:
            raise ModelNotFound()
        file_prefix = str(uuid.uuid4())
        # Inputs get their own secret name: file_prefix is public (every output link holds it).
        input_token = str(uuid.uuid4())
        params = self._params(kind, request, input_token)
        # Refused here, by name, rather than failed later on a GPU.
        errors = refusals(entry, params, self._registry)
        errors |= _url_refusals(request, params, self._outbound_allow)
        if errors:
            raise ValidationFailed(errors)
        await self._store_inputs(request, params)
        extension = params.output_format
        links = [
            self._objects.url(output_key(file_prefix, i, extension, temp=params.temp))
            for i in range(params.outputs)
        ]
        meta = _meta(request.model_id, params, request, file_prefix)
        shape = job_shape(params)
        view = await eta.read_submission(
            self._wire, request.model_id, shape, self._clock(), owner.id
        )
        level = 0
        if self._settings.priority_levels:
            level = lanes.level(plan.priority, view.unfinished, self._settings.fair_backlog)
        inputs = view.at_level(level, self._settings.batch_size)
        default = self._settings.default_eta_seconds
        run_seconds = eta.predict_run_seconds(inputs.stats, shape, default)
        batched = batch_key(request.model_id, params)
        own = eta.Batching(batched, params.samples, level)
        eta_seconds = eta.estimate(inputs, run_seconds, own)
        marker = await self._not_a_duplicate(owner, kind, request)
        message = self._publisher.message_for_create(level)
        job_id = await self._create(
            NewJob(
                owner=owner.id,
                owner_name=owner.name,
                model_id=request.model_id,
                kind=kind,
                params=params.to_dict(),
                meta=meta,
                file_prefix=file_prefix,
                future_links=links,
                predicted_seconds=run_seconds,
                eta_seconds=eta_seconds,
                webhook=request.webhook,
                track_id=request.track_id,
                queue=self._settings.generate_queue,
                level=level,
                batch_key=batched,
                samples=params.samples,
            ),
            plan=plan,
            marker=marker,
            retry_after=run_seconds,
            message=message,
        )
        if message is None:  # else it went with the record
            await self._publish(job_id, level, marker)
        return ProcessingResponse(
            eta=eta_seconds,
            fetch_result=f"{self._settings.public_url}/api/v4/dreambooth/fetch/{job_id}",
            id=job_id,
            meta=meta,
            future_links=[self._objects.present(link) for link in links],
        )

    async def model_reload(self, request: ModelRequest) -> ModelReloadResponse:
        """Ask every worker serving the model to load it now; answers with the load's ETA."""
        await self._admit(await self.authenticate(request.key))
        assert request.model_id is not None  # validated
        if self._registry.model(request.model_id) is None:
            raise ModelNotFound()
        load_seconds = await eta.read_load_seconds(self._redis, request.model_id)
        listeners = await self._redis.publish(keys.CONTROL, f"warm {request.model_id}")
        log.info("model %s: reload asked of %s worker processes", request.model_id, listeners)
        return ModelReloadResponse(eta=round(load_seconds or self._settings.default_eta_seconds, 2))

    async def model_list(self, key: str | None) -> list[ModelListItem]:
        await self.authenticate(key)
        return [
            ModelListItem(
                model_id=model_id,
                model_name=model_id,
                model_category=_CATEGORIES[(entry.family, entry.kind)],
                family=entry.family,
                kind=entry.kind,
            )
            for model_id, entry in self._registry.models.items()
        ]

    async def fetch(self, key: str | None, job_id: int) -> FetchResponse:
        # The key and the record in one round trip: the record is read before the key is known
        # good, and shown only to its owner.
        info, replies = await self._keys.lookup_with(key, [AsyncJobStore.get_command(job_id)])
        owner = self._authenticated(info)
        job = record_of(replies[0])
        # Another key's job answers exactly like an unknown one: ids are sequential, so any
        # difference would let a key enumerate the others' traffic.
        if job is None or job.owner != owner.id:
            raise JobNotFound()
        now = self._clock()
        waiting = None
        if job.status is JobStatus.QUEUED:
            # The work queued ahead of it now, not what was ahead at submission.
            inputs = await eta.read_inputs_ahead_of(
                self._wire, job.id, job.model_id, now, self._settings.batch_size
            )
            own = eta.Batching(job.batch_key, job.samples, job.level)
            waiting = (eta.estimate(inputs, job.predicted_seconds, own), inputs.ahead + 1)
        return job_body(job, now, self._objects.present, waiting)

    def _plan(self, owner: KeyInfo) -> PlanLimits:
        stale = owner.plan is not None and owner.plan not in self._settings.plans
        if stale and owner.plan not in self._unknown_plans:
            assert owner.plan is not None
            self._unknown_plans.add(owner.plan)
            log.warning(
                "plan %r of key %s is not in DREAMQ_PLANS: the default plan %r applies",
                owner.plan,
                owner.id,
                self._settings.default_plan,
            )
        return self._settings.plan_limits(owner.plan)

    async def _admit(self, owner: KeyInfo) -> PlanLimits:
        """The key's plan, once this request is counted against its rate (RateLimited when
        over it). Only requests that start work count: fetch and model_list do not."""
        plan = self._plan(owner)
        if self._limiter is not None:
            await self._limiter.hit(owner.id, plan)
        return plan

    async def _not_a_duplicate(
        self, owner: KeyInfo, kind: JobKind, request: GenerationRequest
    ) -> str | None:
        window = self._settings.duplicate_window_seconds
        if self._limiter is None or window <= 0:
            return None
        digest = fingerprint(kind, request.model_dump(mode="json", exclude={"key"}))
        return await self._limiter.check_duplicate(owner.id, digest, window)

    async def _create(
        self,
        job: NewJob,
        *,
        plan: PlanLimits,
        marker: str | None,
        retry_after: float,
        message: BrokerMessage | None,
    ) -> int:
        """Persist the job (and push its broker message, when given); the plan's cap on
        unfinished jobs is checked in the same step."""
        try:
            return await self._jobs.create(job, max_unfinished=plan.max_queued, message=message)
        except UnfinishedCapReached as full:
            await self._forget(marker)
            # A slot frees when one of the key's jobs ends: about one run time away.
            raise RateLimited(
                retry_after, f"{full.cap} requests already queued or running for this key."
            ) from None
        except Exception:
            await self._forget(marker)
            raise

    async def _forget(self, marker: str | None) -> None:
        """The request was not accepted after all: the same request again is no duplicate."""
        if self._limiter is not None:
            await self._limiter.forget(marker)

    async def _publish(self, job_id: int, level: int, marker: str | None = None) -> None:
        try:
            # On the event loop: the direct Redis publisher, or kombu in a thread (RabbitMQ).
            await self._publisher.publish_job(job_id, level)
        except Exception:
            # The record exists; fail it so a fetch tells the truth instead of "processing" forever.
            log.exception("publishing job %s failed", job_id)
            # No webhook either: the client got a 503 and never learned this id, so a "failed"
            # delivery for it would announce a job it does not know (and may have resubmitted).
            await self._jobs.fail(
                job_id, "The queue is unavailable; the job was not started.", webhook=False
            )
            await self._forget(marker)
            raise ServiceUnavailable("The queue is unavailable, try again later.") from None

    def _params(self, kind: JobKind, request: GenerationRequest, input_token: str) -> JobParams:
        """The effective parameters: defaults applied, caps applied, aliases resolved."""
        steps = request.num_inference_steps
        if steps is None and isinstance(request, InpaintRequest):
            steps = request.steps  # [compat] the hosted inpaint docs call it steps
        scheduler = request.scheduler
        algorithm = request.algorithm_type
        if algorithm is not None and scheduler is None:
            # An algorithm type names a DPMSolver variant; with no scheduler it selects that one.
            scheduler = "DPMSolverMultistepScheduler"
        prompt, negative = request.prompt or "", request.negative_prompt
        image_size = isinstance(request, Img2ImgRequest)
        common: dict[str, Any] = {
            "kind": kind,
            "prompt": prompt,
            "negative_prompt": negative,
            "width": request.width or (None if image_size else DEFAULTS["width"]),
            "height": request.height or (None if image_size else DEFAULTS["height"]),
            "steps": min(steps or DEFAULTS["steps"], self._settings.max_steps),
            "guidance_scale": (
                request.guidance_scale if request.guidance_scale is not None else DEFAULT_GUIDANCE
            ),
            "seed": request.seed if request.seed is not None else secrets.randbelow(2**32),
            "scheduler": scheduler,
            "use_karras_sigmas": (
                request.use_karras_sigmas if request.use_karras_sigmas is not None else True
            ),
            "algorithm_type": algorithm,
        }
        if isinstance(request, Text2VideoRequest):
            fps = request.fps or DEFAULT_FPS
            frames = request.num_frames
            if frames is None:
                frames = round(request.seconds * fps) if request.seconds else DEFAULT_FRAMES
            output_format: OutputFormat = "gif" if request.output_type == "gif" else "mp4"
            return JobParams(**common, num_frames=frames, fps=fps, output_format=output_format)
        assert isinstance(request, Txt2ImgRequest)
        if request.enhance_prompt:
            common["prompt"] = f"{prompt}{ENHANCE_SUFFIX}"
            common["negative_prompt"] = (
                f"{negative}, {ENHANCE_NEGATIVE}" if negative else ENHANCE_NEGATIVE
            )
        strengths = request.lora_strength or (1.0,)
        loras = tuple(
            LoraChoice(lora_id, strengths[index] if len(strengths) > 1 else strengths[0])
            for index, lora_id in enumerate(request.lora_ids)
        )
        safety_type = request.safety_checker_type or "black"
        assert safety_type in SAFETY_ACTIONS  # validated
        extra: dict[str, Any] = {}
        if isinstance(request, Img2ImgRequest):
            strength = request.strength
            extra["strength"] = DEFAULT_STRENGTH if strength is None else strength
            extra["init_image"] = _image_ref(request.init_image, input_token, "init_image")
        if isinstance(request, InpaintRequest):
            extra["mask_image"] = _image_ref(request.mask_image, input_token, "mask_image")
        return JobParams(
            **common,
            samples=request.samples or DEFAULTS["samples"],
            loras=loras,
            embedding=request.embeddings_model,
            vae=request.vae,
            clip_skip=request.clip_skip or 1,
            safety_checker=bool(request.safety_checker),
            safety_checker_type=safety_type,
            tomesd=bool(request.tomesd),
            panorama=bool(request.panorama),
            self_attention=bool(request.self_attention),
            upscale=request.upscale or 1,
            highres_fix=bool(request.highres_fix),
            multi_lingual=bool(request.multi_lingual),
            base64=bool(request.base64),
            temp=bool(request.temp),
            **extra,
        )

    async def _store_inputs(self, request: GenerationRequest, params: JobParams) -> None:
        """Decode base64 input images into the object store: job records stay small, and the
        worker reads every input the same way."""
        if not isinstance(request, Img2ImgRequest):
            return
        errors: FieldErrors = {}
        decoded: dict[str, bytes] = {}
        uses_base64 = bool(request.base64)
        for field in ("init_image", "mask_image"):
            value = getattr(request, field, None)
            if value is None or _is_url(value):
                continue
            try:
                decoded[field] = decode_image_base64(
                    value, explicit=uses_base64, max_bytes=self._settings.input_max_bytes
                )
            except ValueError as exc:
                errors[field] = [f"The {attribute(field)} {exc}"]
        if errors:
            raise ValidationFailed(errors)
        for field, data in decoded.items():
            ref = getattr(params, field)
            assert ref is not None and ref.object_key is not None  # _image_ref named it
            key = ref.object_key
            await anyio.to_thread.run_sync(self._objects.put, key, data, "application/octet-stream")


ENHANCE_SUFFIX = ", highly detailed, sharp focus, professional photography, 8k"
ENHANCE_NEGATIVE = "blurry, low quality, deformed, distorted, watermark, text"

_CATEGORIES = {
    ("sd15", "image"): "stable_diffusion",
    ("sd15", "inpaint"): "stable_diffusion_inpaint",
    ("sd15", "text2video"): "text_to_video",
    ("sdxl", "image"): "stable_diffusion_xl",
    ("sdxl", "inpaint"): "stable_diffusion_xl_inpaint",
    ("sdxl", "text2video"): "text_to_video",
}

_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def _is_url(value: str) -> bool:
    return value.strip().lower().startswith(("http://", "https://"))


def _image_ref(value: str | None, input_token: str, field: str) -> ImageInput:
    assert value is not None  # validated: required
    if _is_url(value):
        return ImageInput(url=value.strip())
    return ImageInput(object_key=input_key(input_token, field))


def decode_image_base64(value: str, *, explicit: bool, max_bytes: int) -> bytes:
    """The bytes of a base64 image, checked strictly; ValueError's text completes "The <field> ".

    [compat] A ``data:image/...;base64,`` prefix marks base64 without the ``base64`` flag.
    """
    text = value.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("must be base64 data (a data: URL with ;base64).")
    elif not explicit:
        raise ValueError('must be an http(s) URL, or base64 data with "base64": "yes".')
    text = "".join(text.split())  # MIME-style line breaks are common
    if len(text) * 3 // 4 > max_bytes:
        raise ValueError(f"is larger than {max_bytes // (1024 * 1024)} MB.")
    try:
        data = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        raise ValueError("is not valid base64.") from None
    if not (data.startswith(_IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
        raise ValueError("is not a PNG, JPEG or WEBP image.")
    return data


def _meta(
    model_id: str, params: JobParams, request: GenerationRequest, file_prefix: str
) -> dict[str, Any]:
    """The `meta` echo of spec §4.1: the effective values the job runs with."""
    meta: dict[str, Any] = {
        "prompt": params.prompt,
        "model_id": model_id,
        "negative_prompt": params.negative_prompt,
        "scheduler": params.scheduler,
        "W": params.width,
        "H": params.height,
        "guidance_scale": params.guidance_scale,
        "seed": params.seed,
        "steps": params.steps,
        "n_samples": params.samples,
        "use_karras_sigmas": _yes(params.use_karras_sigmas),
        "algorithm_type": params.algorithm_type,
        "file_prefix": file_prefix,
    }
    if params.kind == "text2video":
        return meta | {
            "num_frames": params.num_frames,
            "fps": params.fps,
            "output_type": params.output_format,
        }
    meta |= {
        "lora": ",".join(lora.id for lora in params.loras) or None,
        "lora_strength": ",".join(f"{lora.strength:g}" for lora in params.loras) or None,
        "embeddings": params.embedding,
        "vae": params.vae,
        "clip_skip": params.clip_skip,
        "enhance_prompt": _yes(bool(getattr(request, "enhance_prompt", False))),
        "safety_checker": _yes(params.safety_checker),
        "safety_checker_type": params.safety_checker_type,
        "tomesd": _yes(params.tomesd),
        "panorama": _yes(params.panorama),
        "self_attention": _yes(params.self_attention),
        "upscale": str(params.upscale) if params.upscale > 1 else "no",
        "highres_fix": _yes(params.highres_fix),
        "multi_lingual": _yes(params.multi_lingual),
        "temp": _yes(params.temp),
        "base64": _yes(params.base64),
    }
    if params.kind in ("img2img", "inpaint"):
        meta["strength"] = params.strength
        for field in ("init_image", "mask_image"):
            ref = getattr(params, field)
            if ref is not None:
                # A base64 input is not echoed back: it is the client's own bytes, often MBs.
                meta[field] = ref.url if ref.url else "base64"
    return meta


def job_shape(params: JobParams) -> eta.Shape:
    """The statistics' key for a job: a size the request left to the init image counts as the
    default size (the worker learns it under the size it generated)."""
    return eta.Shape.of(
        params, params.width or DEFAULTS["width"], params.height or DEFAULTS["height"]
    )


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _url_refusals(
    request: GenerationRequest, params: JobParams, allow: list[Network]
) -> FieldErrors:
    """The outbound URLs the guard refuses on their face (R16): the webhook and input images
    given as URLs. Host names are resolved only where they are used, by the worker and the
    dispatcher, which check every address again when they connect."""
    urls = {"webhook": request.webhook}
    for field in ("init_image", "mask_image"):
        ref: ImageInput | None = getattr(params, field)
        if ref is not None:
            urls[field] = ref.url
    errors: FieldErrors = {}
    for field, url in urls.items():
        reason = None if url is None else early_refusal(url, allow)
        if reason is not None:
            errors[field] = [f"The {attribute(field)} URL is not allowed: {reason}."]
    return errors


def batch_key(model_id: str, params: JobParams) -> str:
    """The record's batch key: jobs with the same one can share a worker's pipeline call."""
    key = params.batch_key()
    return "" if key is None else f"{model_id}\n{key}"
