"""Runs one job through the state machine.

In the job's own thread (the Celery task): claim, check, start the input downloads, (translate),
generate, (upscale, safety-check). Then the job's tail goes to the process's finisher
(workers/finisher.py) and the task returns, so the next job's compute starts while the tail runs:
encode, store under the promised keys, finish (the terminal transition, under the job's lease),
record the durations and metrics, hand off the webhook. A failure takes the same way: its
transition, metrics and webhook hand-off are a tail too.

A plain class a test can drive with fakes (and an `InlineFinisher`, the default); the Celery task
only calls `run(job_id)`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from dreamq import logs
from dreamq.errors import PublicJobError
from dreamq.jobparams import JobParams
from dreamq.queue import Publisher
from storage.eta import DurationRecorder, Shape
from storage.jobs import ClaimOutcome, JobRecord, JobStore, new_lease_token
from storage.layout import output_key
from storage.objects import ObjectStore
from workers.encode import encode_png, encode_video, to_base64
from workers.finisher import Finisher, InlineFinisher
from workers.generate import Generation
from workers.helpers import HelperModels
from workers.models import ModelLoadError
from workers.prefetch import FetchImage, Inputs, start_inputs
from workers.supervision import TIMEOUT_FAILURE

log = logging.getLogger("dreamq.worker")

GENERIC_FAILURE = "Generation failed; the error was logged on the worker."


class Generates(Protocol):
    def check(self, model_id: str, params: JobParams) -> None: ...

    def run(
        self,
        model_id: str,
        params: JobParams,
        *,
        init_image: Image.Image | None = None,
        mask_image: Image.Image | None = None,
        inputs: Callable[[], Inputs] | None = None,
    ) -> Generation: ...


@dataclasses.dataclass(frozen=True)
class Computed:
    """What a job's compute leaves for its tail."""

    params: JobParams
    images: list[Image.Image]
    """The samples after upscaling and the safety check, or the video's frames."""
    meta: dict[str, Any]
    shape: Shape
    """What the ETA statistics key the job's time by (the size it generated at)."""
    seconds: float
    """Wall time of the work the ETA predicts, so far: translation, the pipeline calls and the
    post-processing. The tail adds its encoding."""
    pipeline_seconds: float
    """Wall time inside the pipeline calls alone (the duty cycle's numerator)."""


class JobRunner:
    def __init__(
        self,
        *,
        jobs: JobStore,
        objects: ObjectStore,
        generator: Generates,
        helpers: HelperModels,
        fetch_image: FetchImage,
        durations: DurationRecorder,
        publisher: Publisher,
        before_job: Callable[[], None] = lambda: None,
        after_job: Callable[[], None] = lambda: None,
        on_finished: Callable[[str, str, str, float], None] | None = None,
        finisher: Finisher | None = None,
        overlap_inputs: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`on_finished(model_id, kind, status, seconds)` hears of every run that ended the job:
        its terminal status and the wall time from the claim (metrics). `finisher` runs each
        job's tail (default: inline, before `run` returns). `overlap_inputs` downloads the input
        images on helper threads while the model is made ready (workers/prefetch.py).
        `before_job` and `after_job` bracket the job's compute, in its own thread."""
        self._jobs = jobs
        self._objects = objects
        self._generator = generator
        self._helpers = helpers
        self._fetch_image = fetch_image
        self._durations = durations
        self._publisher = publisher
        self._before_job = before_job
        self._after_job = after_job
        self._on_finished = on_finished
        self._finisher: Finisher = finisher if finisher is not None else InlineFinisher()
        self._overlap_inputs = overlap_inputs
        self._clock = clock
        self._handed_over: int | None = None
        """The job whose tail went to the finisher last (it may still run)."""

    def run(self, job_id: int) -> float | None:
        """Run the job. Seconds after which this delivery must look again when another process
        holds the job's lease (the broker delivered it twice); None when done with it."""
        self._hook(self._before_job)
        try:
            with logs.bound(job_id=job_id):
                return self._run(job_id)
        finally:
            self._hook(self._after_job)

    def _run(self, job_id: int) -> float | None:
        token = new_lease_token()
        claim = self._jobs.acquire(job_id, token)
        if claim.outcome is ClaimOutcome.LEASED and job_id == self._handed_over:
            # A copy of the job whose tail this process's finisher runs now (a broker blip put
            # its message back): the tail is milliseconds from ending it, so wait for that and
            # look again rather than ask the broker to redeliver once the lease expires.
            self._finisher.drain()
            claim = self._jobs.acquire(job_id, token)
        if claim.outcome is ClaimOutcome.LEASED:
            # The broker delivered it again (visibility timeout) while another process runs it.
            # Looking again once the lease has expired covers a holder that died unseen.
            log.info("job %s: another worker process holds its lease; duplicate exits", job_id)
            return claim.lease_left + 1
        if claim.outcome is ClaimOutcome.EXHAUSTED:
            log.warning("job %s: failed: its attempts are used up", job_id)
            if claim.job is not None and claim.job.webhook:
                self._hand_off_webhook(job_id)
            return None
        job = claim.job
        if job is None:
            # Unknown, or already terminal: a duplicate delivery of a finished job.
            log.info("job %s: nothing to do (unknown or finished)", job_id)
            return None
        claimed = self._clock()
        with logs.bound(model_id=job.model_id, key_name=job.owner_name):
            self._run_claimed(job, token, claimed)
        return None

    def _run_claimed(self, job: JobRecord, token: str, claimed: float) -> None:
        job_id = job.id
        log.info("job %s: processing (model %s, attempt %s)", job_id, job.model_id, job.attempts)
        started = self._clock()
        tail: Callable[[], None]
        try:
            computed = self._compute(job)
        except (PublicJobError, ModelLoadError) as exc:
            log.warning("job %s: failed: %s", job_id, exc.message)
            tail = functools.partial(self._fail, job, token, claimed, exc.message)
        except SoftTimeLimitExceeded:
            log.warning("job %s: failed: over its time limit", job_id)
            tail = functools.partial(self._fail, job, token, claimed, TIMEOUT_FAILURE)
        except Exception:
            log.exception("job %s: failed", job_id)
            tail = functools.partial(self._fail, job, token, claimed, GENERIC_FAILURE)
        else:
            tail = functools.partial(self._succeed, job, token, claimed, started, computed)
        try:
            self._handed_over = job_id
            self._finisher.submit(tail)
        except SoftTimeLimitExceeded:
            # Raised while the previous job's tail still ran (a slow upload): this job's tail was
            # not handed over, so it ends here. (Should the signal land just after the hand-over,
            # both ends are tried: the lease lets exactly one apply, and only it hands off.)
            log.warning("job %s: failed: over its time limit (waiting to be stored)", job_id)
            self._fail(job, token, claimed, TIMEOUT_FAILURE)

    def _compute(self, job: JobRecord) -> Computed:
        """The job's part in its own thread: everything up to the images, GPU work included."""
        try:
            params = JobParams.from_dict(job.params)
            if params.kind != job.kind:
                raise ValueError("The job's parameters do not match its kind.")
            # Checked before the model is loaded: a job it cannot run fails without the cost.
            self._generator.check(job.model_id, params)
        except ValueError as exc:
            raise PublicJobError(str(exc)) from exc
        meta = dict(job.meta)
        helpers = self._helpers
        # Missing helper models fail here, before inputs are fetched or a model is loaded.
        translator = helpers.translator() if params.multi_lingual else None
        upscaler = helpers.upscaler() if params.upscale > 1 else None
        checker = helpers.safety_checker() if params.safety_checker else None
        inputs = start_inputs(
            self._fetch_image,
            params.init_image,
            params.mask_image,
            background=self._overlap_inputs,
        )
        started = self._clock()
        if translator is not None:
            english = translator.translate(params.prompt)
            meta["translated_prompt"] = english
            params = dataclasses.replace(params, prompt=english)
        translated = self._clock()
        try:
            generation = self._generator.run(job.model_id, params, inputs=inputs)
        except ValueError as exc:  # what only the loaded model can tell (its layers, scheduler)
            raise PublicJobError(str(exc)) from exc
        generated = self._clock()
        images = generation.images
        if params.kind != "text2video":
            if upscaler is not None:
                images = upscaler.upscale(
                    images, factor=params.upscale, prompt=params.prompt, seed=params.seed
                )
            if checker is not None:
                images, flagged = checker.apply(images, params.safety_checker_type)
                meta["nsfw_content_detected"] = flagged
        # The work a warm worker repeats for such a job: translation, the pipeline calls and the
        # post-processing (and the encoding, which the tail adds); a cold model load (inside
        # generator.run) is not part of it.
        seconds = (translated - started) + generation.pipeline_seconds + self._clock() - generated
        width, height = images[0].size
        meta.update(W=width, H=height)
        shape = Shape.of(params, generation.width, generation.height)
        return Computed(
            params=params,
            images=images,
            meta=meta,
            shape=shape,
            seconds=seconds,
            pipeline_seconds=generation.pipeline_seconds,
        )

    # --- the tail: on the finisher's thread ------------------------------------------------------

    def _succeed(
        self, job: JobRecord, token: str, claimed: float, started: float, computed: Computed
    ) -> None:
        try:
            output, seconds = self._encode_and_store(job, computed)
            finished = self._jobs.succeed(
                job.id,
                output=output,
                generation_time=seconds,
                pipeline_time=computed.pipeline_seconds,
                meta=computed.meta,
                lease=token,
            )
        except Exception:
            # Never left processing: the job fails (its lease is still held), and says so.
            log.exception("job %s: failed while its outputs were stored or recorded", job.id)
            self._fail(job, token, claimed, GENERIC_FAILURE)
            return
        if finished:
            log.info("job %s: success in %.3f s", job.id, seconds)
        else:
            log.warning(
                "job %s: its success was not recorded: the job had ended or lost its lease", job.id
            )
        self._hook(
            lambda: self._durations.record(
                job.model_id,
                computed.shape.units,
                seconds,
                self._clock() - started,
                shape=computed.shape,
            )
        )
        self._ended(job, "success", claimed, finished)

    def _encode_and_store(self, job: JobRecord, computed: Computed) -> tuple[list[str], float]:
        """(the output links or base64 strings, the generation time including the encoding)."""
        params = computed.params
        encoding = self._clock()
        if params.kind == "text2video":
            assert params.fps is not None  # checked by JobParams
            fmt: Literal["mp4", "gif"] = "gif" if params.output_format == "gif" else "mp4"
            blobs = [encode_video(computed.images, fps=params.fps, fmt=fmt)]
        else:
            blobs = [encode_png(image) for image in computed.images]
        seconds = computed.seconds + self._clock() - encoding
        self._store(job, params, blobs)
        output = [to_base64(blob) for blob in blobs] if params.base64 else job.future_links
        return list(output[: len(blobs)]), seconds

    def _fail(self, job: JobRecord, token: str, claimed: float, message: str) -> None:
        finished = self._jobs.fail(job.id, message, lease=token)
        self._ended(job, "failed", claimed, finished)

    def _ended(self, job: JobRecord, status: str, claimed: float, finished: bool) -> None:
        """After the terminal transition: metrics, and the webhook of the run that applied it."""
        on_finished = self._on_finished
        if finished and on_finished is not None:
            seconds = self._clock() - claimed
            self._hook(lambda: on_finished(job.model_id, job.kind, status, seconds))
        if finished and job.webhook:
            self._hand_off_webhook(job.id)

    @staticmethod
    def _hook(call: Callable[[], None]) -> None:
        # Statistics and reports: a Redis blip there must not cost the job its webhook.
        try:
            call()
        except Exception:
            log.warning("worker bookkeeping failed", exc_info=True)

    def _store(self, job: JobRecord, params: JobParams, blobs: list[bytes]) -> None:
        # The keys are the ones promised in future_links at submission.
        for index, data in enumerate(blobs):
            key = output_key(job.file_prefix, index, params.output_format, temp=params.temp)
            self._objects.put(key, data, params.content_type)

    def _hand_off_webhook(self, job_id: int) -> None:
        try:
            self._publisher.publish_webhook(job_id)
        except Exception:
            log.exception("job %s: could not queue its webhook", job_id)
