"""R25: schemathesis against the API's own OpenAPI document.

The app is the one tests/unit/test_api.py builds (fakeredis, the test registry, the in-memory object
store, a recording publisher). Every operation gets schema-valid and schema-invalid requests, most
of them with a valid key and a registered model id so they get past authentication into the
service; jobs in each state are there to be fetched, and a key on a small plan gets 429s. Each
answer must be no 5xx, a status code documented by number, and a body, headers and content type
as documented for that code.

Not checked: that schema-invalid bodies are refused and schema-valid ones accepted. The contract is
lenient on purpose ([compat] numeric strings, "yes"/"no" flags), and what only the registry knows
(model ids and kinds, LoRA ids) or the schema does not say (scheduler names, URL and base64 forms)
refuses schema-valid bodies, so both directions differ from the document by design.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.routes import (
    FETCH_BY_ID_PATHS,
    FETCH_PATHS,
    IMG2IMG_PATHS,
    INPAINT_PATHS,
    MODEL_LIST_PATHS,
    MODEL_RELOAD_PATHS,
    TEXT2VIDEO_PATHS,
    TXT2IMG_PATHS,
)
from storage.apikeys import ApiKeyStore
from storage.jobs import NewJob
from tests.support.jobs import new_job
from tests.unit.test_api import REGISTRY, Api, build

POST_PATHS = (
    *TXT2IMG_PATHS,
    *IMG2IMG_PATHS,
    *INPAINT_PATHS,
    *TEXT2VIDEO_PATHS,
    *MODEL_RELOAD_PATHS,
    *MODEL_LIST_PATHS,
    *FETCH_PATHS,
    *FETCH_BY_ID_PATHS,
)
OPERATIONS = [("POST", path) for path in POST_PATHS] + [("GET", "/health"), ("GET", "/ready")]
CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
    for method, path in OPERATIONS
    for mode in GenerationMode
    # An operation without parameters or a body has no invalid request to generate.
    if method == "POST" or mode is GenerationMode.POSITIVE
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
EXAMPLES = 40
"""Per operation and generation mode: about 15 s for the whole file on a 2-core machine."""

MODEL_IDS = sorted(REGISTRY.models)
KINDS = [
    ((*TXT2IMG_PATHS, *IMG2IMG_PATHS), "image"),
    (INPAINT_PATHS, "inpaint"),
    (TEXT2VIDEO_PATHS, "text2video"),
]
IMAGE_URL = "https://images.example.com/in.png"


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    """One app for the module: each operation's examples add jobs to the same fakeredis."""
    with build() as api:
        _jobs_in_every_state(api)
        yield api


@pytest.fixture(scope="module")
def keys(api: Api) -> dict[str, str]:
    """The keys a request may carry, by steering choice; "basic" is the default plans' smallest
    (5 queued jobs, bursts of 10), so its requests soon get 429 with Retry-After."""
    limited, _ = ApiKeyStore(api.raw).create("limited", plan="basic")
    return {"valid": api.key, "other": api.other_key, "limited": limited}


@pytest.fixture(scope="module")
def schema(api: Api) -> Any:
    return schemathesis.openapi.from_dict(api.client.app.openapi())  # type: ignore[attr-defined]


def _jobs_in_every_state(api: Api) -> list[int]:
    """Jobs 1..4 of the test key: queued, processing, success, failed (fetch answers each)."""
    owner = ApiKeyStore(api.raw).lookup(api.key)
    assert owner is not None
    ids = [api.jobs.create(_new_job(owner.id)) for _ in range(4)]
    api.jobs.claim(ids[1])
    api.jobs.claim(ids[2])
    assert api.jobs.succeed(ids[2], output=["https://cdn.example.com/x.png"], generation_time=1.0)
    assert api.jobs.fail(ids[3], "The job failed.")
    return ids


def _new_job(owner: str) -> NewJob:
    return new_job(
        owner=owner, meta={"prompt": "a fox"}, future_links=["https://cdn.example.com/p-0.png"]
    )


def test_every_documented_operation_is_fuzzed(schema: Any) -> None:
    documented = {
        (method.upper(), path)
        for path, item in schema.raw_schema["paths"].items()
        for method in item
    }
    assert documented == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_answers_conform_to_the_schema(
    api: Api, keys: dict[str, str], schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    operation = schema[path][method]
    documented = {int(code) for code in operation.definition.raw["responses"] if code.isdigit()}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), choice=_steering(path))
    def check(case: Any, choice: dict[str, Any]) -> None:
        _steer(case, choice, keys)
        response = api.client.request(**_request(case))
        case.validate_response(response, checks=CHECKS)
        # The "4XX" entry documents the error body of any other refusal; the codes the routes
        # give on purpose are each documented by number.
        assert response.status_code in documented, (response.status_code, response.text)

    check()


def _steering(path: str) -> st.SearchStrategy[dict[str, Any]]:
    """Choices of `_steer`, the likely ones first (Hypothesis, derandomized, favours those)."""
    kind = next((kind for paths, kind in KINDS if path in paths), None)
    fitting = [model_id for model_id in MODEL_IDS if REGISTRY.models[model_id].kind == kind]
    others = [model_id for model_id in MODEL_IDS if model_id not in fitting]
    return st.fixed_dictionaries(
        {
            "key": st.sampled_from(["valid", "valid", "valid", "limited", "other", "generated"]),
            "model_id": st.sampled_from([*fitting, *fitting, *others, "generated"]),
            "prompt": st.sampled_from(["a red fox", "generated"]),
            "request_id": st.integers(min_value=0, max_value=6) | st.none(),
            "images": st.sampled_from(["url", "generated"]),
        }
    )


def _steer(case: Any, choice: dict[str, Any], keys: dict[str, str]) -> None:
    """Point a generated request at what the service does past validation: a valid key (or the
    other tenant's, or one over its limits), a registered model, a prompt, existing job ids, URL
    inputs. Only fields the operation documents are replaced, so an invalid body stays invalid
    in its other fields."""
    if "id" in (case.path_parameters or {}) and choice["request_id"] is not None:
        case.path_parameters["id"] = choice["request_id"]
    body = case.body
    if not isinstance(body, dict):
        return
    if choice["key"] in keys:
        body["key"] = keys[choice["key"]]
    fields = set(case.operation.body[0].definition["schema"].get("properties", {}))
    if choice["model_id"] != "generated" and "model_id" in fields:
        body["model_id"] = choice["model_id"]
    if choice["prompt"] != "generated" and "prompt" in fields:
        body["prompt"] = choice["prompt"]
    if choice["request_id"] is not None and "request_id" in fields:
        body["request_id"] = choice["request_id"]
    if choice["images"] == "url":
        for field in {"init_image", "mask_image"} & fields:
            body[field] = IMAGE_URL


def _request(case: Any) -> dict[str, Any]:
    """The case as TestClient (httpx) arguments."""
    kwargs: dict[str, Any] = case.as_transport_kwargs(base_url="http://testserver")
    if not kwargs.get("cookies"):
        kwargs.pop("cookies", None)
    if isinstance(kwargs.get("data"), bytes | str):
        kwargs["content"] = kwargs.pop("data")
    return kwargs
