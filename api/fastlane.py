"""The two calls clients make most, served without FastAPI's request machinery when well formed.

A submission (`POST /api/v4/dreambooth`, text to image) and a fetch by id are most of an API
process's traffic: every client polls its jobs. FastAPI's route handling (dependencies, body
parsing, response validation, its exception wrappers) cost about 300 µs of CPU per request on
top of the service's own 500-900 µs (docs/performance.md). This middleware answers those two
routes itself when the request is plainly well formed: a JSON content type, a body that parses
and validates against the route's own request model, and (for a fetch) a decimal id. It calls
the same service method the route calls and sends the same JSON body.

Anything else goes to FastAPI untouched, its body replayed: validation errors, odd content
types, malformed ids, every other route. So FastAPI still gives every error answer, and the
OpenAPI document still describes these routes. Errors the service raises are answered by the
app's own exception handlers (api/errors.py), as when the route raises them.

It sits inside the metrics and body-cap middlewares: those see every request the same way (the
route label is the FastAPI route's template), and the body it reads is already capped.
tests/unit/test_fastlane.py sends every kind of request both ways and compares the answers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.routes import FETCH_BY_ID_PATHS, TXT2IMG_PATHS, FetchAnswer
from api.service import DreamboothService
from dreamq.contract import KeyOnlyRequest, ProcessingResponse, Txt2ImgRequest

Call = Callable[[DreamboothService, Any, dict[str, str]], Awaitable[BaseModel]]


@dataclass(frozen=True)
class Lane:
    """One route served directly: its path as a regex, its request model, the service call
    the route makes, and how its answer is serialized (the route's response model)."""

    route: APIRoute
    path: re.Pattern[str]
    request: type[BaseModel]
    call: Call
    answer: TypeAdapter[Any]


def _fetch(
    service: DreamboothService, body: KeyOnlyRequest, params: dict[str, str]
) -> Awaitable[BaseModel]:
    return service.fetch(body.key, int(params["id"]))  # as api/routes.py `fetch_by_id`


def _submit(
    service: DreamboothService, body: Txt2ImgRequest, params: dict[str, str]
) -> Awaitable[BaseModel]:
    return service.submit("txt2img", body)  # as api/routes.py `text2img`


def _path_regex(template: str) -> re.Pattern[str]:
    """A route template's path, its `{id}` a decimal job id (anything else goes to FastAPI,
    which answers it as it always did)."""
    return re.compile("^" + re.escape(template).replace(r"\{id\}", r"(?P<id>[0-9]{1,18})") + "$")


def lanes_of(router: APIRouter) -> list[Lane]:
    """The lanes for the router's routes (the app includes it as is: FastAPI notes these same
    route objects in the scope, which label the metrics)."""
    routes = {
        route.path: route
        for route in router.routes
        if isinstance(route, APIRoute) and "POST" in (route.methods or ())
    }
    fetch_answer: TypeAdapter[Any] = TypeAdapter(FetchAnswer)
    submit_answer: TypeAdapter[Any] = TypeAdapter(ProcessingResponse)
    lanes = [
        Lane(routes[path], _path_regex(path), KeyOnlyRequest, _fetch, fetch_answer)
        for path in FETCH_BY_ID_PATHS
    ]
    lanes += [
        Lane(routes[path], _path_regex(path), Txt2ImgRequest, _submit, submit_answer)
        for path in TXT2IMG_PATHS
    ]
    return lanes


class FastLane:
    def __init__(self, app: ASGIApp, *, lanes: list[Lane]) -> None:
        self.app = app
        self._lanes = lanes
        self.served = 0
        """Requests it answered itself (not handed to FastAPI): tests read it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        for lane in self._lanes:
            matched = lane.path.match(scope["path"])
            if matched is not None:
                await self._serve(lane, matched.groupdict(), scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self, lane: Lane, params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        scope["route"] = lane.route  # what FastAPI's router notes for the metrics' label
        scope["path_params"] = params
        app = scope["app"]
        replay = receive
        try:
            body, replay = await _read_body(receive)  # the body cap raises its 413 from here
            try:
                request = lane.request.model_validate(json.loads(body))
            except Exception:  # FastAPI words the refusal, as for any route (nesting too deep
                # for json.loads raises RecursionError, which FastAPI answers 400 too)
                await self.app(scope, replay, send)
                return
            answer = await lane.call(app.state.service, request, params)
        except Exception as exc:
            handler = _handler_for(app.exception_handlers, exc)
            if handler is None:
                raise  # the server error middleware answers it, as it would the route's
            response = await handler(Request(scope, replay), exc)
            await response(scope, replay, send)
            self.served += 1
            return
        self.served += 1
        content = lane.answer.dump_json(answer, by_alias=True)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(content)).encode()),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})


def _is_json(scope: Scope) -> bool:
    """FastAPI parses a body as JSON for a JSON media type; this serves plain application/json
    only (no content type, or a `+json` one, still goes the long way)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


async def _read_body(receive: Receive) -> tuple[bytes, Receive]:
    """The whole body, and a `receive` that gives it again (to FastAPI, when it answers)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: FastAPI sees it too
            replayed: list[Message] = [message]
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            replayed = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
            break
    body = b"".join(chunks)

    async def replay() -> Message:
        return replayed.pop() if replayed else await receive()

    return body, replay


def _handler_for(
    handlers: dict[Any, Callable[..., Any]], exc: Exception
) -> Callable[..., Any] | None:
    """The app's handler for `exc`'s class or its nearest base, as Starlette looks it up;
    None for the catch-all `Exception` one, which the server error middleware applies."""
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            handler: Callable[..., Any] = handlers[cls]
            return handler
    return None
