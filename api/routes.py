"""Routes of the Dreambooth API V4 and the paths clients reach the same functions by."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path

from api.deps import Service
from dreamq.contract import (
    ErrorResponse,
    FailedResponse,
    FetchProcessingResponse,
    FetchRequest,
    KeyOnlyRequest,
    ProcessingResponse,
    SuccessResponse,
    Txt2ImgRequest,
)

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 503)
}
FetchAnswer = SuccessResponse | FetchProcessingResponse | FailedResponse

TXT2IMG_PATHS = ["/api/v4/dreambooth", "/api/v6/images/text2img"]
FETCH_PATHS = ["/api/v4/dreambooth/fetch", "/api/v6/images/fetch"]
FETCH_BY_ID_PATHS = [
    "/api/v4/dreambooth/fetch/{id}",
    # [compat] the hosted v4 service puts this v3 URL in fetch_result, so clients call it.
    "/api/v3/dreambooth/fetch/{id}",
    "/api/v6/images/fetch/{id}",
]


async def text2img(body: Txt2ImgRequest, service: Service) -> ProcessingResponse:
    """Text to image (also LoRA and multi-LoRA). Answers at once with an id and an ETA."""
    return await service.submit_txt2img(body)


async def fetch(body: FetchRequest, service: Service) -> FetchAnswer:
    """The state of a queued request: processing with the remaining ETA, success, or failed."""
    assert body.request_id is not None
    return await service.fetch(body.key, body.request_id)


async def fetch_by_id(
    body: KeyOnlyRequest, service: Service, id: int = Path(description="Request id")
) -> FetchAnswer:
    """The state of a queued request, by id in the path."""
    return await service.fetch(body.key, id)


for _endpoint, _paths, _tag in (
    (text2img, TXT2IMG_PATHS, "generation"),
    (fetch, FETCH_PATHS, "fetch"),
    (fetch_by_id, FETCH_BY_ID_PATHS, "fetch"),
):
    for _path in _paths:
        router.add_api_route(
            _path,
            _endpoint,
            methods=["POST"],
            responses=_ERRORS,
            tags=[_tag],
            name=f"{_endpoint.__name__}:{_path}",
        )
