"""The one place where errors become HTTP responses."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException

from dreamq.capabilities import unknown_ids
from dreamq.contract import attribute
from dreamq.errors import DreamqError, FieldErrors, PayloadTooLarge, RateLimited

log = logging.getLogger("dreamq.api")

REDIS_DOWN = "The job store is unavailable, try again later."

# Fallback texts for pydantic error types our own validators do not raise (wrong JSON types).
_GENERIC = {
    "int_parsing": "The {attr} must be a number.",
    "int_type": "The {attr} must be a number.",
    "string_type": "The {attr} must be a string.",
}


def error_body(message: str | FieldErrors) -> dict[str, Any]:
    return {"status": "error", "message": message, "messege": message}  # [compat] both spellings


def field_errors(errors: Any) -> FieldErrors:
    """Turn pydantic/FastAPI errors into the vendor's {field: [messages]} map.

    Only our own message texts and field names go out: never the offending input, which could
    be a key or a secret pasted in the wrong field.
    """
    fields: FieldErrors = {}
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        kind = error.get("type", "")
        ctx = error.get("ctx") or {}
        if kind == "json_invalid":
            field, text = "body", "The request body is not valid JSON."
        elif len(loc) < 2 and "field" not in ctx:
            field, text = "body", "The request body must be a JSON object."
        else:
            field = str(ctx.get("field") or loc[1])
            if kind in _GENERIC:
                text = _GENERIC[kind].format(attr=attribute(field))
            elif kind.startswith(("int_", "float_", "string_", "bool_", "list_", "dict_")) or (
                len(loc) > 2
            ):
                text = f"The {attribute(field)} is invalid."
            else:
                text = str(error.get("msg", "invalid"))
        messages = fields.setdefault(field, [])
        if text not in messages:
            messages.append(text)
    return fields


async def _known_key(request: Request, key: Any) -> bool:
    if not isinstance(key, str) or not key:
        return False
    try:
        await request.app.state.service.authenticate(key)
    except DreamqError:
        return False
    return True


def install(app: FastAPI, *, legacy_http_200: bool) -> None:
    def status(code: int) -> int:
        return 200 if legacy_http_200 else code  # [compat] the hosted API answers 200 to errors

    async def on_dreamq_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DreamqError)
        headers = None
        if isinstance(exc, RateLimited):
            # Sent in legacy mode too: a 200 with Retry-After still tells a client when to retry.
            headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse(
            error_body(exc.message), status_code=status(exc.http_status), headers=headers
        )

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = field_errors(exc.errors())
        if isinstance(exc.body, dict) and await _known_key(request, exc.body.get("key")):
            # Every offending field at once: unknown LoRA/embedding/VAE ids too, which are
            # otherwise checked after validation (and only for a valid key: the registry is
            # the deployment's business).
            registry = request.app.state.service.registry
            for field, messages in unknown_ids(registry, exc.body).items():
                errors.setdefault(field, messages)
        return JSONResponse(error_body(errors), status_code=status(400))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's own refusals (413 body too large, 404 unknown path, 405) in the same body
        # shape as every other error.
        assert isinstance(exc, HTTPException)
        if exc.status_code == PayloadTooLarge.http_status:
            message = PayloadTooLarge().message
        else:
            message = str(exc.detail)
        code = status(exc.status_code) if request.url.path.startswith("/api/") else exc.status_code
        return JSONResponse(error_body(message), status_code=code, headers=exc.headers)

    async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
        # Not the client's fault, and likely to pass: 503, which clients retry, not a 500.
        log.warning("Redis unavailable on %s: %s", request.url.path, exc)
        return JSONResponse(
            error_body(REDIS_DOWN), status_code=status(503), headers={"Retry-After": "1"}
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("Internal server error"), status_code=status(500))

    app.add_exception_handler(DreamqError, on_dreamq_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RedisConnectionError, on_redis_down)
    app.add_exception_handler(RedisTimeoutError, on_redis_down)
    app.add_exception_handler(Exception, on_unexpected)
