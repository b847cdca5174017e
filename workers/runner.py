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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol

from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from dreamq import logs
from dreamq.errors import PublicJobError
from dreamq.jobparams import JobParams
from dreamq.queue import Publisher
from storage.claims import ClaimStore
from storage.eta import DurationRecorder, Shape
from storage.jobs import Claim, ClaimOutcome, JobRecord, JobStore, new_lease_token
from storage.layout import output_key
from storage.objects import ObjectStore
from workers.encode import encode_png, encode_video, to_base64
from workers.finisher import Finisher, InlineFinisher
from workers.generate import Generation
from workers.helpers import HelperModels
from workers.models import ModelLoadError
from workers.prefetch import FetchImage, Inputs, start_inputs
from workers.routing import plan
from workers.supervision import TIMEOUT_FAILURE

log = logging.getLogger("dreamq.worker")

GENERIC_FAILURE = "Generation failed; the error was logged on the worker."

CLAIM_TRIES = 3
"""Reads of the queue's head a message makes when other processes claim first what it chose."""


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

    def run_batch(
        self,
        model_id: str,
        batch: Sequence[JobParams],
        *,
        inputs: Sequence[Callable[[], Inputs] | None],
    ) -> list[Generation | Exception]: ...


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
    batched: bool = False
    """It shared its pipeline call with other jobs (its times are its share)."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A claimed job made ready for its pipeline call: checked, translated, inputs on their way."""

    job: JobRecord
    params: JobParams
    meta: dict[str, Any]
    inputs: Callable[[], Inputs]
    upscaler: Any
    checker: Any
    translation_seconds: float


@dataclasses.dataclass(frozen=True)
class Routing:
    """How a worker process chooses its work (workers/routing.py); without it a message runs
    its own job."""

    claims: ClaimStore
    warm: Callable[[], Iterable[str]]
    """The models this process holds now."""
    process: str
    """This process's '<host>:<pid>'."""
    batch_images: int = 1
    """The most images one pipeline call makes for a batch of jobs (1: no batching)."""
    hand_off: Callable[[int, int, str], None] = lambda job_id, level, node: None
    """Send a message for (job id, level) to Celery node `node`."""


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
        routing: Routing | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`on_finished(model_id, kind, status, seconds)` hears of every run that ended the job:
        its terminal status and the wall time from the claim (metrics). `finisher` runs each
        job's tail (default: inline, before `run` returns). `overlap_inputs` downloads the input
        images on helper threads while the model is made ready (workers/prefetch.py).
        `before_job` and `after_job` bracket the job's compute, in its own thread. `routing`
        lets a message claim the work that suits this process (workers/routing.py)."""
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
        self._routing = routing
        self._clock = clock
        self._handed_over: frozenset[int] = frozenset()
        """The jobs whose tail went to the finisher last (it may still run)."""

    def run(self, job_id: int, *, node: str = "", routed: bool = False) -> float | None:
        """Run the work a message for `job_id` brings (with routing: what this process claims
        for it, on Celery node `node`; `routed`: a message another node handed over). Seconds
        after which this delivery must look again when another process holds the job's lease
        (the broker delivered it twice); None when done with it."""
        self._hook(self._before_job)
        try:
            with logs.bound(job_id=job_id):
                if self._routing is None:
                    return self._run(job_id)
                return self._run_routed(self._routing, job_id, node, routed)
        finally:
            self._hook(self._after_job)

    def _run(self, job_id: int) -> float | None:
        token = new_lease_token()
        claim = self._jobs.acquire(job_id, token)
        if claim.outcome is ClaimOutcome.LEASED and job_id in self._handed_over:
            # A copy of the job whose tail this process's finisher runs now (a broker blip put
            # its message back): the tail is milliseconds from ending it, so wait for that and
            # look again rather than ask the broker to redeliver once the lease expires.
            self._finisher.drain()
            claim = self._jobs.acquire(job_id, token)
        return self._after_claim(job_id, token, claim)

    def _after_claim(self, job_id: int, token: str, claim: Claim) -> float | None:
        if claim.outcome is ClaimOutcome.LEASED:
            # The broker delivered it again (visibility timeout) while another process runs it.
            # Looking again once the lease has expired covers a holder that died unseen.
            log.info("job %s: another worker process holds its lease; duplicate exits", job_id)
            return claim.lease_left + 1
        if claim.outcome is ClaimOutcome.EXHAUSTED:
            self._exhausted(claim)
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

    def _exhausted(self, claim: Claim) -> None:
        job = claim.job
        if job is None:
            return
        log.warning("job %s: failed: its attempts are used up", job.id)
        if job.webhook:
            self._hand_off_webhook(job.id)

    def _run_routed(self, routing: Routing, job_id: int, node: str, routed: bool) -> float | None:
        if job_id in self._handed_over:
            # A copy of a job whose tail this process's finisher may run now (a broker blip put
            # its message back, or the job ran in this process's last batch): the tail is
            # milliseconds from ending it, so let it end first.
            self._finisher.drain()
        token = new_lease_token()
        claims: list[Claim] = []
        handed_off = False
        for _ in range(CLAIM_TRIES):
            view = routing.claims.read_view(job_id, time.time())
            chosen = plan(
                view,
                own_job=job_id,
                node=node,
                warm=frozenset(routing.warm()),
                batch_images=routing.batch_images,
                routed=routed,
            )
            if chosen.hand_off is not None and not handed_off:
                # This message stands in for the job it hands over: one is enough.
                handed_off = True
                handed, target = chosen.hand_off
                level = next(job.level for job in view.head if job.id == handed)
                log.info("job %s: left to node %s, which holds its model warm", handed, target)
                self._hook(functools.partial(routing.hand_off, handed, level, target))
            if chosen.recover:
                return self._after_claim(job_id, token, self._jobs.acquire(job_id, token))
            if not chosen.take:
                if view.own_status is None or view.own_status.is_terminal():
                    log.info("job %s: nothing to do (unknown or finished)", job_id)
                else:
                    log.info("job %s: no queued job for this process", job_id)
                break
            now = time.time()
            predicted = {job.id: job.predicted_seconds for job in view.head}
            until = now + sum(predicted.get(job, 0.0) for job in chosen.take)
            claims = routing.claims.claim(
                chosen.take, token, process=routing.process, node=node, now=now, until=until
            )
            if any(claim.outcome is not ClaimOutcome.GONE for claim in claims):
                break
        for claim in claims:
            if claim.outcome is ClaimOutcome.EXHAUSTED:
                self._exhausted(claim)
        # A message whose job another claim runs still looks again once that lease has expired
        # (as without routing): its holder may have died unseen. It finds the job ended, and
        # claims nothing or what is queued then.
        look_again = None
        if view.own_held_elsewhere():
            look_again = view.own_lease_left + 1
            log.info(
                "job %s: another worker process holds its lease; this message looks again in "
                "%.0f s",
                job_id,
                look_again,
            )
        jobs = [c.job for c in claims if c.outcome is ClaimOutcome.CLAIMED and c.job is not None]
        if not jobs:
            if claims:  # every claim lost its race: the busy note it wrote is not true
                self._hook(lambda: routing.claims.note_busy(routing.process, node, time.time()))
            return look_again
        claimed = self._clock()
        try:
            with logs.bound(job_id=jobs[0].id, model_id=jobs[0].model_id):
                if len(jobs) == 1:
                    with logs.bound(key_name=jobs[0].owner_name):
                        self._run_claimed(jobs[0], token, claimed)
                else:
                    self._run_batch(jobs, token, claimed)
        finally:
            # Free for the next message, whatever the prediction said: others judge by it.
            self._hook(lambda: routing.claims.note_busy(routing.process, node, time.time()))
        return look_again

    def _run_claimed(self, job: JobRecord, token: str, claimed: float) -> None:
        job_id = job.id
        log.info("job %s: processing (model %s, attempt %s)", job_id, job.model_id, job.attempts)
        started = self._clock()
        tail: Callable[[], None]
        try:
            computed = self._compute(job)
        except Exception as exc:
            tail = self._failure_tail(job, token, claimed, exc)
        else:
            tail = functools.partial(self._succeed, job, token, claimed, started, computed)
        self._submit(tail, [job], token, claimed)

    def _submit(
        self, tail: Callable[[], None], jobs: list[JobRecord], token: str, claimed: float
    ) -> None:
        try:
            self._handed_over = frozenset(job.id for job in jobs)
            self._finisher.submit(tail)
        except SoftTimeLimitExceeded:
            # Raised while the previous job's tail still ran (a slow upload): this tail was not
            # handed over, so its jobs end here. (Should the signal land just after the
            # hand-over, both ends are tried: the lease lets exactly one apply, and only it
            # hands off.)
            for job in jobs:
                log.warning("job %s: failed: over its time limit (waiting to be stored)", job.id)
                self._fail(job, token, claimed, TIMEOUT_FAILURE)

    def _compute(self, job: JobRecord) -> Computed:
        """The job's part in its own thread: everything up to the images, GPU work included."""
        prepared = self._prepare(job)
        try:
            generation = self._generator.run(job.model_id, prepared.params, inputs=prepared.inputs)
        except ValueError as exc:  # what only the loaded model can tell (its layers, scheduler)
            raise PublicJobError(str(exc)) from exc
        return self._post(prepared, generation)

    def _prepare(self, job: JobRecord) -> Prepared:
        """Check the job, find its helper models, start its input downloads and translate its
        prompt: what comes before its pipeline call."""
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
        return Prepared(
            job=job,
            params=params,
            meta=meta,
            inputs=inputs,
            upscaler=upscaler,
            checker=checker,
            translation_seconds=self._clock() - started,
        )

    def _post(self, prepared: Prepared, generation: Generation) -> Computed:
        """Upscale and safety-check the job's images: what comes after its pipeline call."""
        params, meta = prepared.params, prepared.meta
        generated = self._clock()
        images = generation.images
        if params.kind != "text2video":
            if prepared.upscaler is not None:
                images = prepared.upscaler.upscale(
                    images, factor=params.upscale, prompt=params.prompt, seed=params.seed
                )
            if prepared.checker is not None:
                images, flagged = prepared.checker.apply(images, params.safety_checker_type)
                meta["nsfw_content_detected"] = flagged
        # The work a warm worker repeats for such a job: translation, the pipeline calls (its
        # share of a batch's) and the post-processing (and the encoding, which the tail adds); a
        # cold model load (inside the generator) is not part of it.
        seconds = (
            prepared.translation_seconds + generation.pipeline_seconds + self._clock() - generated
        )
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

    def _run_batch(self, jobs: list[JobRecord], token: str, claimed: float) -> None:
        """Jobs claimed together (workers/routing.py: one batch key) run as one pipeline call;
        each keeps its own checks, inputs, outputs, failure and webhook. Their tails go to the
        finisher as one."""
        log.info(
            "jobs %s: processing as one batch (model %s)",
            ", ".join(str(job.id) for job in jobs),
            jobs[0].model_id,
        )
        for job in jobs:
            log.info(
                "job %s: processing (model %s, attempt %s) in a batch of %d",
                job.id,
                job.model_id,
                job.attempts,
                len(jobs),
            )
        started = self._clock()
        tails: list[Callable[[], None]] = []
        prepared: list[Prepared] = []
        for job in jobs:
            try:
                prepared.append(self._prepare(job))
            except Exception as exc:
                tails.append(self._failure_tail(job, token, claimed, exc))
        if prepared:
            try:
                results = self._generator.run_batch(
                    jobs[0].model_id,
                    [ready.params for ready in prepared],
                    inputs=[ready.inputs for ready in prepared],
                )
            except Exception as exc:
                results = [exc] * len(prepared)
            for ready, result in zip(prepared, results, strict=True):
                job = ready.job
                try:
                    if isinstance(result, ValueError) and not isinstance(result, PublicJobError):
                        # What only the loaded model can tell, as for a job alone (_compute).
                        raise PublicJobError(str(result)) from result
                    if isinstance(result, Exception):
                        raise result
                    computed = dataclasses.replace(self._post(ready, result), batched=True)
                except Exception as exc:
                    tails.append(self._failure_tail(job, token, claimed, exc))
                else:
                    tails.append(
                        functools.partial(self._succeed, job, token, claimed, started, computed)
                    )
        self._submit(functools.partial(_run_all, tails), jobs, token, claimed)

    def _failure_tail(
        self, job: JobRecord, token: str, claimed: float, exc: BaseException
    ) -> Callable[[], None]:
        """The tail that fails `job` for `exc`, with a message fit for its client."""
        if isinstance(exc, PublicJobError | ModelLoadError):
            log.warning("job %s: failed: %s", job.id, exc.message)
            message = exc.message
        elif isinstance(exc, SoftTimeLimitExceeded):
            log.warning("job %s: failed: over its time limit", job.id)
            message = TIMEOUT_FAILURE
        else:
            log.error("job %s: failed", job.id, exc_info=exc)
            message = GENERIC_FAILURE
        return functools.partial(self._fail, job, token, claimed, message)

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
        # How long the job held the worker: from its start to its success; for a batched job
        # its own share (the batch's wall time from its start would count every member's).
        held = seconds if computed.batched else self._clock() - started
        self._hook(
            lambda: self._durations.record(
                job.model_id, computed.shape.units, seconds, held, shape=computed.shape
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


def _run_all(tails: list[Callable[[], None]]) -> None:
    """A batch's tails, one after the other: each ends its own job whatever the others do."""
    for tail in tails:
        try:
            tail()
        except Exception:
            log.exception("a job's tail failed")
