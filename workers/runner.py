"""Runs one job through the state machine.

Claim, check, fetch inputs, (translate), generate, (upscale, safety-check), encode, store under
the promised keys, finish, hand off the webhook.

A plain class a test can drive with fakes; the Celery task only calls `run(job_id)`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from dreamq import logs
from dreamq.errors import PublicJobError
from dreamq.jobparams import ImageInput, JobParams
from dreamq.queue import Publisher
from storage.eta import DurationRecorder, work_units
from storage.jobs import ClaimOutcome, JobRecord, JobStore, new_lease_token
from storage.layout import output_key
from storage.objects import ObjectStore
from workers.encode import encode_png, encode_video, to_base64
from workers.generate import Generation
from workers.helpers import HelperModels
from workers.models import ModelLoadError
from workers.supervision import TIMEOUT_FAILURE

log = logging.getLogger("dreamq.worker")

GENERIC_FAILURE = "Generation failed; the error was logged on the worker."

FetchImage = Callable[[ImageInput, str], Image.Image]
"""Loads an input image (a URL or a stored object) for a field; PublicJobError when it cannot."""


class Generates(Protocol):
    def check(self, model_id: str, params: JobParams) -> None: ...

    def run(
        self,
        model_id: str,
        params: JobParams,
        *,
        init_image: Image.Image | None = None,
        mask_image: Image.Image | None = None,
    ) -> Generation: ...


@dataclasses.dataclass(frozen=True)
class Outcome:
    output: list[str]
    seconds: float
    """Wall time of the work the ETA predicts: generation and post-processing."""
    meta: dict[str, Any]
    units: float
    """The work generated, for the ETA statistics."""


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
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`on_finished(model_id, kind, status, seconds)` hears of every run that ended the job:
        its terminal status and the wall time from the claim (metrics)."""
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
        self._clock = clock

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
        try:
            outcome = self._process(job)
        except (PublicJobError, ModelLoadError) as exc:
            log.warning("job %s: failed: %s", job_id, exc.message)
            finished = self._jobs.fail(job_id, exc.message, lease=token)
            status = "failed"
        except SoftTimeLimitExceeded:
            log.warning("job %s: failed: over its time limit", job_id)
            finished = self._jobs.fail(job_id, TIMEOUT_FAILURE, lease=token)
            status = "failed"
        except Exception:
            log.exception("job %s: failed", job_id)
            finished = self._jobs.fail(job_id, GENERIC_FAILURE, lease=token)
            status = "failed"
        else:
            finished = self._jobs.succeed(
                job_id,
                output=outcome.output,
                generation_time=outcome.seconds,
                meta=outcome.meta,
                lease=token,
            )
            status = "success"
            log.info("job %s: success in %.3f s", job_id, outcome.seconds)
            self._hook(
                lambda: self._durations.record(
                    job.model_id, outcome.units, outcome.seconds, self._clock() - started
                )
            )
        on_finished = self._on_finished
        if finished and on_finished is not None:
            seconds = self._clock() - claimed
            self._hook(lambda: on_finished(job.model_id, job.kind, status, seconds))
        if finished and job.webhook:
            self._hand_off_webhook(job_id)

    def _process(self, job: JobRecord) -> Outcome:
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
        init = self._input(params.init_image, "init_image")
        mask = self._input(params.mask_image, "mask_image")
        started = self._clock()
        if translator is not None:
            english = translator.translate(params.prompt)
            meta["translated_prompt"] = english
            params = dataclasses.replace(params, prompt=english)
        translated = self._clock()
        try:
            generation = self._generator.run(job.model_id, params, init_image=init, mask_image=mask)
        except ValueError as exc:  # what only the loaded model can tell (its layers, scheduler)
            raise PublicJobError(str(exc)) from exc
        generated = self._clock()
        images = generation.images
        if params.kind == "text2video":
            assert params.fps is not None  # checked by JobParams
            fmt: Literal["mp4", "gif"] = "gif" if params.output_format == "gif" else "mp4"
            blobs = [encode_video(images, fps=params.fps, fmt=fmt)]
        else:
            if upscaler is not None:
                images = upscaler.upscale(
                    images, factor=params.upscale, prompt=params.prompt, seed=params.seed
                )
            if checker is not None:
                images, flagged = checker.apply(images, params.safety_checker_type)
                meta["nsfw_content_detected"] = flagged
            blobs = [encode_png(image) for image in images]
        # The work a warm worker repeats for such a job: translation, the pipeline calls and the
        # post-processing; a cold model load (inside generator.run) is not part of it.
        seconds = (translated - started) + generation.pipeline_seconds + self._clock() - generated
        width, height = images[0].size
        meta.update(W=width, H=height)
        self._store(job, params, blobs)
        output = [to_base64(blob) for blob in blobs] if params.base64 else job.future_links
        units = work_units(
            generation.width,
            generation.height,
            params.steps,
            params.samples * (params.num_frames or 1),
        )
        return Outcome(output=list(output[: len(blobs)]), seconds=seconds, meta=meta, units=units)

    @staticmethod
    def _hook(call: Callable[[], None]) -> None:
        # Statistics and reports: a Redis blip there must not cost the job its webhook.
        try:
            call()
        except Exception:
            log.warning("worker bookkeeping failed", exc_info=True)

    def _input(self, ref: ImageInput | None, field: str) -> Image.Image | None:
        return None if ref is None else self._fetch_image(ref, field)

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
