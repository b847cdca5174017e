"""The webhook dispatcher: runs on CPU workers consuming the `webhooks` queue, never on GPU workers.

One delivery = one POST of the job's fetch body plus `track_id`. The shape leaves room for what
comes next (signing, a retry schedule, attempt records): `deliver` builds the request, a
`WebhookSender` sends it, and the outcome is recorded on the job.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import httpx

from dreamq.contract import webhook_body
from dreamq.outbound import BlockedUrl, Network, check_url
from storage.jobs import JobStore, WebhookStatus

log = logging.getLogger("dreamq.webhooks")


@dataclass(frozen=True)
class Delivery:
    url: str
    body: bytes
    headers: dict[str, str]


class WebhookSender(Protocol):
    def send(self, delivery: Delivery) -> int:
        """POST the delivery; return the HTTP status. Raises httpx.HTTPError on transport errors."""
        ...


class HttpWebhookSender:
    """One HTTP client per dispatcher process; redirects are never followed."""

    def __init__(self, timeout_seconds: float) -> None:
        self._client = httpx.Client(
            follow_redirects=False, timeout=timeout_seconds, headers={"user-agent": "dreamq"}
        )

    def send(self, delivery: Delivery) -> int:
        response = self._client.post(delivery.url, content=delivery.body, headers=delivery.headers)
        return response.status_code


def delivery_id(job_id: int, event: str) -> str:
    """Stable per event, so consumers can dedupe every attempt of one delivery."""
    return f"msg_{job_id}_{event}"


class WebhookDispatcher:
    def __init__(
        self,
        *,
        jobs: JobStore,
        sender: WebhookSender,
        allow: Iterable[Network] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jobs = jobs
        self._sender = sender
        self._allow = list(allow)
        self._clock = clock

    def deliver(self, job_id: int) -> WebhookStatus | None:
        job = self._jobs.get(job_id)
        if job is None or not job.webhook or not job.status.is_terminal():
            log.info("job %s: no webhook to deliver", job_id)
            return None
        body = json.dumps(webhook_body(job, self._clock()), separators=(",", ":")).encode()
        delivery = Delivery(
            url=job.webhook,
            body=body,
            headers={
                "content-type": "application/json",
                "webhook-id": delivery_id(job_id, job.status.value),
            },
        )
        outcome = self._attempt(job_id, delivery)
        self._jobs.set_webhook_status(job_id, outcome)
        return outcome

    def _attempt(self, job_id: int, delivery: Delivery) -> WebhookStatus:
        try:
            check_url(delivery.url, self._allow)
            status = self._sender.send(delivery)
        except BlockedUrl as exc:
            log.warning("job %s: webhook refused: %s", job_id, exc)
            return WebhookStatus.FAILED
        except httpx.HTTPError as exc:
            log.warning("job %s: webhook transport error: %s", job_id, type(exc).__name__)
            return WebhookStatus.FAILED
        if 200 <= status < 300:
            log.info("job %s: webhook delivered (%s)", job_id, status)
            return WebhookStatus.SENT
        log.warning("job %s: webhook answered %s", job_id, status)
        return WebhookStatus.FAILED
