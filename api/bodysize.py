"""The request body cap (R20): a body over it gets 413 without being read into memory.

FastAPI's own ``max_body_size`` answers with Starlette's plain-text 413, replacing any response
the app would send, so the contract's error body could not be kept; this middleware keeps it.
A declared Content-Length over the cap is refused before the app runs; a chunked body is counted
as it arrives and refused at the first chunk that passes the cap.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from dreamq.errors import PayloadTooLarge


class BodyTooLarge(HTTPException):
    """Raised from ``receive``: FastAPI re-raises HTTPExceptions met while reading a body, so
    api/errors.py answers it in the contract's shape."""

    def __init__(self) -> None:
        super().__init__(PayloadTooLarge.http_status, str(PayloadTooLarge().message))


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int, legacy_http_200: bool) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.legacy_http_200 = legacy_http_200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            legacy = self.legacy_http_200 and scope["path"].startswith("/api/")
            status = 200 if legacy else PayloadTooLarge.http_status
            # Connection close: the client is still sending a body nobody will read.
            response = JSONResponse(
                error_body(str(PayloadTooLarge().message)),
                status_code=status,
                headers={"connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        await self.app(scope, counted, send)
