"""The public error hierarchy. Each error carries the message clients see and its HTTP status;
api/errors.py maps them to responses in one place. Tracebacks never reach a client."""

from __future__ import annotations

import math

FieldErrors = dict[str, list[str]]


class DreamqError(Exception):
    """An error whose message is safe to show a client."""

    http_status = 400

    def __init__(self, message: str | FieldErrors) -> None:
        super().__init__(message)
        self.message = message


class ValidationFailed(DreamqError):
    """Bad input, reported per field in the vendor's {field: [messages]} shape."""

    http_status = 400

    def __init__(self, errors: FieldErrors) -> None:
        super().__init__(errors)
        self.errors = errors


class InvalidApiKey(DreamqError):
    http_status = 401

    def __init__(self) -> None:
        # [compat] the hosted API's exact text; identical for unknown, revoked and malformed keys.
        super().__init__("Invalid Api Key")


class ModelNotFound(DreamqError):
    http_status = 400

    def __init__(self) -> None:
        super().__init__("Model id not found")  # [compat] clients match this text


class JobNotFound(DreamqError):
    """Unknown id, or an id that belongs to another key: the same answer for both."""

    http_status = 404

    def __init__(self) -> None:
        super().__init__("Request not found")


class PayloadTooLarge(DreamqError):
    http_status = 413

    def __init__(self) -> None:
        super().__init__("Request body too large")


class ServiceUnavailable(DreamqError):
    http_status = 503


class RateLimited(DreamqError):
    """A per-key limit refused the request; the client may try again after `retry_after` s."""

    http_status = 429

    def __init__(self, retry_after: float, detail: str = "") -> None:
        # [compat] clients match the substring "limit exceeded" of the hosted API's text.
        super().__init__(f"Rate limit exceeded{': ' + detail if detail else ''}")
        self.retry_after = max(1, math.ceil(retry_after))
        """Whole seconds, at least 1: the Retry-After header allows nothing finer."""


class PublicJobError(Exception):
    """Raised inside a worker when a job fails for a reason the client may read."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
