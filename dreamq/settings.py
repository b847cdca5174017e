"""The one settings object, built once at process start and passed down.

No module reads os.environ itself.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dreamq.lanes import Lane
from dreamq.signing import is_secret


class PlanLimits(BaseModel):
    """One plan's per-key limits; a limit left out is not applied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int | None = Field(
        None, ge=1, description="Sustained rate of generation and model_reload requests."
    )
    burst: int | None = Field(
        None,
        ge=1,
        description="Requests that may arrive at once on a rested key; defaults to "
        "requests_per_minute.",
    )
    max_queued: int | None = Field(
        None, ge=1, description="Queued plus processing jobs a key may have at once."
    )
    priority: Lane = Field(
        "normal",
        description="The lane its keys' jobs wait in: high before normal before low "
        "(dreamq/lanes.py).",
    )

    @model_validator(mode="after")
    def _burst_needs_a_rate(self) -> PlanLimits:
        if self.burst is not None and self.requests_per_minute is None:
            raise ValueError("burst needs requests_per_minute")
        return self

    @property
    def effective_burst(self) -> int | None:
        if self.requests_per_minute is None:
            return None
        return self.burst or self.requests_per_minute


# [compat] modelled on the hosted service's tiers, which cap queued requests at 5, 10 and 15.
DEFAULT_PLANS = {
    "basic": PlanLimits(requests_per_minute=60, burst=10, max_queued=5),
    "standard": PlanLimits(requests_per_minute=120, burst=20, max_queued=10),
    "premium": PlanLimits(requests_per_minute=300, burst=50, max_queued=15),
    "unlimited": PlanLimits(),
}
_PLAN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_plans(value: Any) -> dict[str, PlanLimits]:
    """DREAMQ_PLANS (a JSON object, or an already parsed mapping) -> plans, with errors that name
    the plan and the limit at fault: the CLI prints only the message, not pydantic's location."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"DREAMQ_PLANS is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict) or not value:
        example = '{"basic": {"requests_per_minute": 60, "burst": 10, "max_queued": 5}}'
        raise ValueError(f"DREAMQ_PLANS must be a JSON object of plan -> limits, e.g. {example}")
    plans: dict[str, PlanLimits] = {}
    for name, limits in value.items():
        if not isinstance(name, str) or not _PLAN_NAME.match(name):
            raise ValueError(
                f"DREAMQ_PLANS: plan name {name!r} must be 1-64 letters, digits, '_', '-' or '.'"
            )
        if isinstance(limits, PlanLimits):
            plans[name] = limits
            continue
        try:
            plans[name] = PlanLimits.model_validate(limits)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, error['loc'])) or 'limits'}: "
                f"{error['msg'].removeprefix('Value error, ')}"
                for error in exc.errors()
            )
            raise ValueError(f"DREAMQ_PLANS: plan {name!r}: {problems}") from None
    return plans


class Settings(BaseSettings):
    """Every knob of dreamq. Each field is the environment variable ``DREAMQ_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="DREAMQ_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis for job records, API keys and statistics."
    )
    broker_url: str | None = Field(
        None, description="Celery broker URL; defaults to DREAMQ_REDIS_URL."
    )
    storage_url: str = Field(
        "file:///var/lib/dreamq/outputs",
        description="Where outputs go: s3://bucket/prefix or file:///absolute/dir.",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="Endpoint of an S3-compatible server (MinIO, moto, ...). "
        "Credentials come from the usual AWS_* variables.",
    )
    s3_public_url: str | None = Field(
        None,
        description="Public base URL of the bucket for output links; defaults to "
        "<endpoint>/<bucket> (path style).",
    )
    output_links: Literal["public", "presigned"] = Field(
        "public",
        description="public: output links are plain URLs of a public-read bucket. presigned: "
        "the bucket is private and every fetch and webhook carries freshly presigned links "
        "(S3 storage only).",
    )
    output_link_seconds: int = Field(
        24 * 3600,
        gt=0,
        le=7 * 24 * 3600,
        description="Lifetime of a presigned output link (at most 7 days, S3's limit); links "
        'to temp: "yes" outputs live at most 24 h.',
    )
    public_url: str = Field(
        "http://127.0.0.1:8000",
        description="Where clients reach the API: base of fetch_result and of /files/ links.",
    )
    models_file: Path | None = Field(None, description="The model registry (YAML).")

    device: str = Field(
        "auto",
        description="Torch device of the workers: auto (cuda when present), cuda, cuda:N, cpu.",
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weights dtype: auto is float16 on CUDA and float32 on CPU."
    )

    generate_queue: str = Field("generate", description="Celery queue of generation jobs.")
    webhook_queue: str = Field("webhooks", description="Celery queue of webhook deliveries.")

    default_eta_seconds: float = Field(
        10.0, gt=0, description="Run time assumed for a model with no history yet."
    )
    max_steps: int = Field(
        51, ge=1, le=51, description="Deployment cap on num_inference_steps (contract: 1..51)."
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="Per-attempt timeout of a webhook POST."
    )
    webhook_retry_schedule: str = Field(
        "5,300,1800,7200,18000,36000,36000",
        description="Comma-separated seconds to wait before each webhook retry (one attempt more "
        "than entries); each wait is jittered by +-20%. The default (Standard Webhooks') spans "
        "27.6 h.",
    )
    webhook_secret_rotation_seconds: float = Field(
        24 * 3600.0,
        ge=0,
        description="After `dreamq keys rotate-secret`, how long the old webhook secret still "
        "signs deliveries alongside the new one.",
    )
    outbound_allow_cidrs: str = Field(
        "",
        description="Comma-separated private CIDRs dreamq may connect to for webhooks and image "
        "URLs (everything else must be a public address). dreamq dev allows loopback.",
    )
    input_max_bytes: int = Field(
        20 * 1024 * 1024, gt=0, description="Largest init_image/mask_image accepted, in bytes."
    )
    max_body_bytes: int | None = Field(
        None,
        gt=0,
        description="Largest request body the API reads, in bytes; a larger one gets 413 before "
        "it is read. Default: room for two base64 input images of DREAMQ_INPUT_MAX_BYTES.",
    )
    input_max_pixels: int = Field(
        4096 * 4096,
        gt=0,
        description="Largest input image in pixels, checked before it is decoded.",
    )
    input_timeout_seconds: float = Field(
        15.0, gt=0, description="Total deadline for fetching one input image URL."
    )
    model_idle_seconds: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="A model unused this long is unloaded from worker memory (model_reload "
        "brings it back).",
    )
    legacy_http_200: bool = Field(
        False, description="[compat] Answer every error body with HTTP 200, like the hosted API."
    )
    plans: Annotated[dict[str, PlanLimits], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_PLANS),
        description="JSON object of plan name -> limits (requests_per_minute, burst, "
        "max_queued) and lane (priority: high, normal, low); a limit left out is not applied.",
    )
    default_plan: str = Field(
        "unlimited", description="The plan of a key created without --plan (and of older keys)."
    )
    fair_backlog: int = Field(
        4,
        ge=0,
        description="A key with this many unfinished jobs queues its next ones one priority level "
        "lower, behind other keys' fresh work of its lane; 0 turns fair sharing off.",
    )
    batch_size: int = Field(
        4,
        ge=1,
        description="The most images a worker makes in one pipeline call for queued jobs that "
        "can share it (same model, kind, size, steps, scheduler, guidance, LoRA set); 1 turns "
        "batching off. The default is the contract's largest samples, so a batch never needs "
        "more memory than one allowed job. The API reads it too, for the ETA.",
    )
    duplicate_window_seconds: int = Field(
        0,
        ge=0,
        description="[compat] Refuse a key's request identical to one it made less than this many "
        "seconds ago (the hosted service: about 30); 0 turns it off.",
    )
    rate_limit_redis_url: str | None = Field(
        None, description="Redis of the rate limiter's counters; defaults to DREAMQ_REDIS_URL."
    )
    rate_limit_when_down: Literal["open", "closed"] = Field(
        "open",
        description="When the rate limiter's Redis is down: open admits requests unthrottled "
        "(a warning is logged), closed answers 503.",
    )
    job_ttl_seconds: int = Field(
        7 * 24 * 3600, gt=0, description="How long a finished job record stays fetchable."
    )
    job_time_limit: float = Field(
        600.0,
        gt=0,
        description="Hard limit on one generation job, in seconds (model loading included): the "
        "worker kills the job's process and the job fails with a timeout.",
    )
    visibility_timeout: float = Field(
        3600.0,
        gt=0,
        description="Seconds after which the broker hands an unacknowledged job to another worker "
        "(how long a job of a dead worker waits). At least twice DREAMQ_JOB_TIME_LIMIT.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Deliveries of one job before it is failed (a job that crashes its "
        "worker process every time).",
    )
    reconcile_seconds: float = Field(
        30.0,
        gt=0,
        description="Period of the reconciler (in every dispatcher; one runs at a time): a job or "
        "webhook whose broker message was lost (a broker restart without persistence, a flushed "
        "queue) is published again within two periods.",
    )
    heartbeat_seconds: float = Field(
        10.0,
        gt=0,
        le=10,
        description="Seconds between a worker's heartbeats (its liveness record in Redis). A "
        "worker is stale after 3 intervals without one, and stalled after 3 intervals without "
        "consuming; at most 10, since the ETA counts workers heard from in the last 30 s.",
    )
    dev_api_key: str | None = Field(
        None, description="dreamq dev only: the API key to register (else one is generated)."
    )
    dev_webhook_secret: str | None = Field(
        None,
        description="dreamq dev only: the dev key's webhook signing secret, whsec_... (else one "
        "is generated).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of every dreamq process."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text, or one JSON object a line with job_id, model_id and "
        "key_name (the key's name, never the key) when known.",
    )
    metrics_port: int = Field(
        9100,
        ge=0,
        le=65535,
        description="Port of a worker's or dispatcher's Prometheus metrics (its main process "
        "serves its pool's); 0: none. The API serves /metrics on its own port.",
    )

    @field_validator("public_url", "s3_public_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _check_retry_schedule(cls, value: str) -> str:
        parse_retry_schedule(value)
        return value

    @field_validator("dev_webhook_secret")
    @classmethod
    def _check_dev_webhook_secret(cls, value: str | None) -> str | None:
        if value and not is_secret(value):
            raise ValueError("DREAMQ_DEV_WEBHOOK_SECRET must be whsec_<base64 of 24+ bytes>")
        return value

    @model_validator(mode="after")
    def _check_storage_url(self) -> Settings:
        if not self.storage_url.startswith(("s3://", "file:///")):
            raise ValueError("DREAMQ_STORAGE_URL must be s3://bucket[/prefix] or file:///abs/dir")
        if self.output_links == "presigned" and not self.storage_url.startswith("s3://"):
            raise ValueError(
                "DREAMQ_OUTPUT_LINKS=presigned needs S3 storage: the local directory store "
                "serves its files publicly under /files/"
            )
        return self

    @field_validator("plans", mode="before")
    @classmethod
    def _check_plans(cls, value: Any) -> dict[str, PlanLimits]:
        return parse_plans(value)

    @model_validator(mode="after")
    def _check_default_plan(self) -> Settings:
        if self.default_plan not in self.plans:
            raise ValueError(
                f"DREAMQ_DEFAULT_PLAN {self.default_plan!r} is not a plan of DREAMQ_PLANS "
                f"({', '.join(sorted(self.plans))})"
            )
        return self

    def plan_limits(self, name: str | None) -> PlanLimits:
        """The limits of plan `name`; the default plan's for None or a plan no longer
        configured (a key keeps its plan name when the operator removes the plan)."""
        return self.plans.get(name or self.default_plan) or self.plans[self.default_plan]

    @model_validator(mode="after")
    def _check_timeouts(self) -> Settings:
        # A job still running when the visibility timeout expires is delivered again (R3).
        if self.visibility_timeout < 2 * self.job_time_limit:
            raise ValueError(
                f"DREAMQ_VISIBILITY_TIMEOUT ({self.visibility_timeout:g} s) must be at least twice "
                f"DREAMQ_JOB_TIME_LIMIT ({self.job_time_limit:g} s): raise the first or lower the "
                "second"
            )
        return self

    @model_validator(mode="after")
    def _check_lanes(self) -> Settings:
        # Levels are kombu Redis message priorities; a RabbitMQ queue serves first come first.
        if self.priority_levels:
            return self
        laned = sorted(name for name, plan in self.plans.items() if plan.priority != "normal")
        if laned:
            raise ValueError(
                f"DREAMQ_PLANS: the priority of plan {laned[0]} needs a Redis broker; "
                "DREAMQ_BROKER_URL is not Redis, so every job waits in one lane"
            )
        return self

    @property
    def priority_levels(self) -> bool:
        """Whether jobs wait at priority levels (lanes, fair sharing): on a Redis broker."""
        return self.effective_broker_url.startswith(("redis://", "rediss://", "unix://"))

    @property
    def soft_time_limit(self) -> float:
        """When the job is asked to stop (it fails with a timeout), a little before the hard
        limit kills its process."""
        return self.job_time_limit - min(30.0, max(0.5, self.job_time_limit / 10))

    @property
    def lease_seconds(self) -> int:
        """Lifetime of a job's lease: past the time limit, below the visibility timeout, so a
        redelivery after a lost worker finds it expired."""
        return math.ceil(self.job_time_limit + min(60.0, self.job_time_limit / 2))

    @property
    def body_limit(self) -> int:
        """The request body cap: base64 grows 4/3, and init_image and mask_image may both be
        uploads, plus room for every other field."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return 2 * math.ceil(self.input_max_bytes * 4 / 3) + 1024 * 1024

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def webhook_retry_delays(self) -> tuple[float, ...]:
        return parse_retry_schedule(self.webhook_retry_schedule)


def parse_retry_schedule(text: str) -> tuple[float, ...]:
    """'5,300,1800' -> (5.0, 300.0, 1800.0): the waits before retries 1, 2, 3. Empty: no retry."""
    try:
        delays = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError("a retry schedule is comma-separated seconds, e.g. 5,300,1800") from None
    if any(not delay >= 0 or delay == float("inf") for delay in delays):
        raise ValueError("retry delays must be finite and >= 0 seconds")
    return delays
