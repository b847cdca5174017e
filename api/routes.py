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
    Img2ImgRequest,
    InpaintRequest,
    KeyOnlyRequest,
    ModelListItem,
    ModelReloadResponse,
    ModelRequest,
    ProcessingResponse,
    SuccessResponse,
    Text2VideoRequest,
    Txt2ImgRequest,
)

router = APIRouter()

# Every error answer has the ErrorResponse body; these are the codes the routes give. "4XX" also
# keeps FastAPI from documenting a 422 with its own body: validation errors are 400s here.
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid fields (named each), or unknown model"},
    401: {"model": ErrorResponse, "description": "Invalid Api Key (unknown, revoked, malformed)"},
    404: {"model": ErrorResponse, "description": "Request not found (or another key's)"},
    413: {"model": ErrorResponse, "description": "Request body over the deployment's cap"},
    429: {
        "model": ErrorResponse,
        "description": "Over the key's request rate or queued-jobs cap",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before trying again",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    },
    503: {"model": ErrorResponse, "description": "A service it needs is down; try again later"},
    "4XX": {"model": ErrorResponse, "description": "Any other refusal, in the same body"},
}
FetchAnswer = SuccessResponse | FetchProcessingResponse | FailedResponse

TXT2IMG_PATHS = ["/api/v4/dreambooth", "/api/v6/images/text2img"]
IMG2IMG_PATHS = ["/api/v4/dreambooth/img2img", "/api/v6/images/img2img"]
INPAINT_PATHS = ["/api/v4/dreambooth/inpaint", "/api/v6/images/inpaint"]
TEXT2VIDEO_PATHS = ["/api/v4/dreambooth/text2video", "/api/v6/video/text2video"]
FETCH_PATHS = ["/api/v4/dreambooth/fetch", "/api/v6/images/fetch"]
FETCH_BY_ID_PATHS = [
    "/api/v4/dreambooth/fetch/{id}",
    # [compat] the hosted v4 service puts this v3 URL in fetch_result, so clients call it.
    "/api/v3/dreambooth/fetch/{id}",
    "/api/v6/images/fetch/{id}",
]
MODEL_RELOAD_PATHS = ["/api/v4/dreambooth/model_reload", "/api/v6/images/model_reload"]
MODEL_LIST_PATHS = ["/api/v4/dreambooth/model_list"]


async def text2img(body: Txt2ImgRequest, service: Service) -> ProcessingResponse:
    """Text to image (also LoRA and multi-LoRA). Answers at once with an id and an ETA."""
    return await service.submit("txt2img", body)


async def img2img(body: Img2ImgRequest, service: Service) -> ProcessingResponse:
    """Image to image from init_image (a URL or base64). Answers at once with an id and an ETA."""
    return await service.submit("img2img", body)


async def inpaint(body: InpaintRequest, service: Service) -> ProcessingResponse:
    """Repaint the white part of mask_image in init_image. Answers at once with an id and ETA."""
    return await service.submit("inpaint", body)


async def text2video(body: Text2VideoRequest, service: Service) -> ProcessingResponse:
    """A video (mp4 or gif) from a prompt. Answers at once with an id and an ETA."""
    return await service.submit("text2video", body)


async def model_reload(body: ModelRequest, service: Service) -> ModelReloadResponse:
    """Load a model on the workers now (models idle for long are unloaded)."""
    return await service.model_reload(body)


async def model_list(body: KeyOnlyRequest, service: Service) -> list[ModelListItem]:
    """The models this deployment serves."""
    return await service.model_list(body.key)


async def fetch(body: FetchRequest, service: Service) -> FetchAnswer:
    """The state of a queued request: processing with the remaining ETA, success, or failed."""
    assert body.request_id is not None
    return await service.fetch(body.key, body.request_id)


async def fetch_by_id(
    body: KeyOnlyRequest, service: Service, id: int = Path(description="Request id")
) -> FetchAnswer:
    """The state of a queued request, by id in the path."""
    return await service.fetch(body.key, id)


# In the order the router tries them: the two calls clients make most (a submission, then fetches
# until it is done) first; each route tried costs a match (about 1 µs).
for _endpoint, _paths, _tag in (
    (fetch_by_id, FETCH_BY_ID_PATHS, "fetch"),
    (text2img, TXT2IMG_PATHS, "generation"),
    (img2img, IMG2IMG_PATHS, "generation"),
    (inpaint, INPAINT_PATHS, "generation"),
    (text2video, TEXT2VIDEO_PATHS, "generation"),
    (model_reload, MODEL_RELOAD_PATHS, "models"),
    (model_list, MODEL_LIST_PATHS, "models"),
    (fetch, FETCH_PATHS, "fetch"),
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
