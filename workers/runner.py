"""Runs one job through the state machine.

Claim, generate, store outputs, finish, hand off the webhook.

A plain class a test can drive with fakes; the Celery task only calls `run(job_id)`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from dreamq.errors import PublicJobError
from dreamq.queue import Publisher
from storage.eta import DurationRecorder, work_units
from storage.jobs import JobRecord, JobStore
from storage.layout import output_key
from storage.objects import ObjectStore
from workers.encode import encode_png
from workers.models import LoadedModel, ModelLoadError
from workers.pipelines import txt2img

log = logging.getLogger("dreamq.worker")

GENERIC_FAILURE = "Generation failed; the error was logged on the worker."


class ModelProvider(Protocol):
    def get(self, model_id: str) -> LoadedModel: ...


class JobRunner:
    def __init__(
        self,
        *,
        jobs: JobStore,
        objects: ObjectStore,
        models: ModelProvider,
        durations: DurationRecorder,
        publisher: Publisher,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._jobs = jobs
        self._objects = objects
        self._models = models
        self._durations = durations
        self._publisher = publisher
        self._clock = clock

    def run(self, job_id: int) -> None:
        job = self._jobs.claim(job_id)
        if job is None:
            # Unknown, or already terminal: a duplicate delivery of a finished job.
            log.info("job %s: nothing to do (unknown or finished)", job_id)
            return
        log.info("job %s: processing (model %s, attempt %s)", job_id, job.model_id, job.attempts)
        started = self._clock()
        try:
            output, run_seconds = self._generate(job)
        except (PublicJobError, ModelLoadError) as exc:
            log.warning("job %s: failed: %s", job_id, exc.message)
            finished = self._jobs.fail(job_id, exc.message)
        except Exception:
            log.exception("job %s: failed", job_id)
            finished = self._jobs.fail(job_id, GENERIC_FAILURE)
        else:
            finished = self._jobs.succeed(job_id, output=output, generation_time=run_seconds)
            params = job.params
            units = work_units(
                params["width"], params["height"], params["steps"], params["samples"]
            )
            self._durations.record(job.model_id, units, run_seconds, self._clock() - started)
            log.info("job %s: success in %.3f s", job_id, run_seconds)
        if finished and job.webhook:
            self._hand_off_webhook(job_id)

    def _generate(self, job: JobRecord) -> tuple[list[str], float]:
        if job.kind != "txt2img":
            raise PublicJobError(f"This worker cannot run {job.kind} jobs.")
        try:
            params = txt2img.Txt2ImgParams.from_job(job.params)
            # Checked before the model is loaded: a job it cannot run fails without the cost.
            txt2img.check_inputs(params)
        except ValueError as exc:
            raise PublicJobError(str(exc)) from exc
        model = self._models.get(job.model_id)
        started = self._clock()
        images = txt2img.run(
            model.pipe,
            params,
            default_scheduler_config=model.default_scheduler_config,
            default_scheduler=model.default_scheduler,
        )
        run_seconds = self._clock() - started
        self._store(job, [encode_png(image) for image in images])
        return list(job.future_links[: len(images)]), run_seconds

    def _store(self, job: JobRecord, blobs: list[bytes]) -> None:
        # The keys are the ones promised in future_links at submission.
        for index, data in enumerate(blobs):
            self._objects.put(output_key(job.file_prefix, index), data, "image/png")

    def _hand_off_webhook(self, job_id: int) -> None:
        try:
            self._publisher.publish_webhook(job_id)
        except Exception:
            log.exception("job %s: could not queue its webhook", job_id)
