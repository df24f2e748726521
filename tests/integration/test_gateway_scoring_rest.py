"""The scoring service's REST surface end to end, through the gateway in front of the whole mesh
(registry, scoring on onnxruntime, real PostgreSQL): a model uploaded over REST, scored through
the Open Inference Protocol's /v2 binding with JSON tensors, its logged prediction read back,
given feedback and listed through ``scoremesh.scoring.v1.Scoring``'s /v1 routes."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests import onnx_factory
from tests.conftest import fresh_database
from tests.integration.gateway_harness import RunningGateway, running_mesh
from tests.integration.scoring_harness import eventually

pytestmark = pytest.mark.integration

MODEL = "clf"
ALL_SCOPES = ("models:read", "models:write", "score")
ROWS = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


@pytest.fixture(scope="module")
async def mesh(postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningGateway]:
    """One mesh for the module, on its own database: tests that count predictions use a
    tenant of their own."""
    async with (
        fresh_database(postgres_dsn) as database_url,
        running_mesh(database_url, tmp_path_factory.mktemp("mesh")) as running,
    ):
        yield running


async def _push(mesh: RunningGateway, tenant: str, model: str) -> bytes:
    """Uploads an ONNX model as ``model`` of ``tenant`` through REST, aliased production."""
    data = onnx_factory.tiny_classifier(seed=5)
    headers = await mesh.key(tenant, "models:read", "models:write")
    async with mesh.http.post(
        f"{mesh.url}/v1/models/{model}/versions:upload",
        params={"alias": "production"},
        data=data,
        headers={**headers, "Content-Type": "application/octet-stream"},
    ) as response:
        assert response.status == 200, await response.text()
    return data


@pytest.fixture(scope="module")
async def model(mesh: RunningGateway) -> bytes:
    """``clf`` of tenant acme."""
    return await _push(mesh, "acme", MODEL)


async def _call(
    mesh: RunningGateway,
    method: str,
    path: str,
    headers: Mapping[str, str],
    *,
    json: Any = None,
    data: bytes | None = None,
    params: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """Status and JSON body of one request (every answer here is JSON, errors included)."""
    async with mesh.http.request(
        method, f"{mesh.url}{path}", headers=headers, json=json, data=data, params=params
    ) as response:
        assert response.content_type == "application/json", (response.status, await response.text())
        return response.status, await response.json()


def _infer_body(rows: np.ndarray[Any, Any], **extra: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
    return {"inputs": [tensor], **extra}


async def _score(
    mesh: RunningGateway, headers: Mapping[str, str], rows: np.ndarray[Any, Any], model: str = MODEL
) -> str:
    """Scores ``rows`` through /v2 with JSON tensors; returns the request id the log keys on."""
    status, answer = await _call(mesh, "POST", f"/v2/models/{model}/infer", headers, json=_infer_body(rows))
    assert status == 200, answer
    assert answer["model_name"] == model
    [output] = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32", [len(rows), 3])
    request_id = answer["parameters"]["request_id"]
    assert isinstance(request_id, str)
    assert request_id
    return request_id


async def _logged(mesh: RunningGateway, headers: Mapping[str, str], request_id: str) -> dict[str, Any]:
    """The prediction once the log has written it (the log batches its writes)."""
    found: dict[str, Any] = {}

    async def written() -> bool:
        status, body = await _call(mesh, "GET", f"/v1/predictions/{request_id}", headers)
        assert status in (200, 404), body
        found.update(body if status == 200 else {})
        return status == 200

    await eventually(written)
    return found


def _error_fields(body: Mapping[str, Any]) -> list[str]:
    # the OIP routes add `error` (the message) for KServe's and Triton's clients
    assert set(body) - {"error"} == {"code", "message", "details"}, body
    return [
        violation["field"]
        for detail in body["details"]
        if detail["@type"] == BAD_REQUEST
        for violation in detail["fieldViolations"]
    ]


def _reason(body: Mapping[str, Any]) -> str:
    [info] = [detail for detail in body["details"] if detail["@type"] == ERROR_INFO]
    reason: str = info["reason"]
    return reason


def _tensor(logged: Mapping[str, Any]) -> np.ndarray[Any, Any]:
    assert logged["datatype"] == "FP32"
    shape = [int(dim) for dim in logged["shape"]]  # int64: proto3 JSON writes strings
    return np.frombuffer(base64.b64decode(logged["rawContents"]), dtype="<f4").reshape(shape)


async def test_a_prediction_scored_over_rest_is_logged_given_feedback_and_listed(
    mesh: RunningGateway,
) -> None:
    # a model of its own: the listings below are exact
    model = await _push(mesh, "initech", "iris")
    headers = await mesh.key("initech", *ALL_SCOPES)
    request_id = await _score(mesh, headers, ROWS, "iris")

    prediction = await _logged(mesh, headers, request_id)
    assert prediction["requestId"] == request_id
    assert (prediction["model"], prediction["version"], prediction["backend"]) == ("iris", "1", "onnxruntime")
    assert prediction["feedback"] == []
    [logged_input] = prediction["inputs"]
    assert logged_input["name"] == "input"
    np.testing.assert_array_equal(_tensor(logged_input), ROWS)
    [logged_output] = prediction["outputs"]
    assert logged_output["name"] == "probabilities"
    expected = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": ROWS})[0]
    np.testing.assert_allclose(_tensor(logged_output), expected, rtol=1e-5, atol=1e-6)

    # the body of POST /v1/feedback is the Feedback itself (body: "feedback")
    status, feedback = await _call(
        mesh, "POST", "/v1/feedback", headers, json={"requestId": request_id, "label": "setosa"}
    )
    assert status == 200, feedback
    assert (feedback["requestId"], feedback["label"]) == (request_id, "setosa")
    assert (feedback["model"], feedback["version"]) == ("iris", "1")
    assert feedback["createdBy"]
    assert feedback["createTime"]
    # proto field names are read too, and a tensor is as good as a label
    truth = base64.b64encode(np.array([0.0, 1.0, 0.0], dtype="<f4").tobytes()).decode()
    status, tensor_feedback = await _call(
        mesh,
        "POST",
        "/v1/feedback",
        headers,
        json={"request_id": request_id, "tensor": {"datatype": "FP32", "shape": [3], "raw_contents": truth}},
    )
    assert status == 200, tensor_feedback
    assert tensor_feedback["tensor"]["shape"] == ["3"]

    status, prediction = await _call(mesh, "GET", f"/v1/predictions/{request_id}", headers)
    assert status == 200, prediction
    assert [f.get("label") for f in prediction["feedback"]] == ["setosa", None]
    assert prediction["feedback"][1]["tensor"]["rawContents"] == truth

    # a second prediction, without feedback: newest first, filters and pages
    second = await _score(mesh, headers, ROWS[:1], "iris")
    await _logged(mesh, headers, second)
    path = "/v1/models/iris/predictions"
    status, listed = await _call(mesh, "GET", path, headers)
    assert status == 200, listed
    assert [p["requestId"] for p in listed["predictions"]] == [second, request_id]
    assert listed["nextPageToken"] == ""
    status, listed = await _call(mesh, "GET", path, headers, params={"withFeedbackOnly": "true"})
    assert [p["requestId"] for p in listed["predictions"]] == [request_id]
    status, first_page = await _call(mesh, "GET", path, headers, params={"page_size": "1"})
    assert [p["requestId"] for p in first_page["predictions"]] == [second]
    status, last_page = await _call(
        mesh, "GET", path, headers, params={"pageSize": "1", "pageToken": first_page["nextPageToken"]}
    )
    assert status == 200, last_page
    assert [p["requestId"] for p in last_page["predictions"]] == [request_id]
    assert last_page["nextPageToken"] == ""
    status, listed = await _call(mesh, "GET", path, headers, params={"version": "2"})
    assert (status, listed["predictions"]) == (200, [])


async def test_a_key_without_the_score_scope_is_refused_on_every_scoring_route(
    mesh: RunningGateway, model: bytes
) -> None:
    scorer = await mesh.key("acme", "score")
    request_id = await _score(mesh, scorer, ROWS)
    await _logged(mesh, scorer, request_id)
    no_score = await mesh.key("acme", "models:read", "models:write")
    calls: list[tuple[str, str, Any]] = [
        ("GET", f"/v1/predictions/{request_id}", None),
        ("GET", f"/v1/models/{MODEL}/predictions", None),
        ("POST", "/v1/feedback", {"requestId": request_id, "label": "x"}),
        ("POST", f"/v2/models/{MODEL}/infer", _infer_body(ROWS)),
        ("GET", f"/v2/models/{MODEL}", None),
        ("GET", f"/v2/models/{MODEL}/ready", None),
        ("GET", "/v2", None),
    ]
    for method, path, body in calls:
        status, error = await _call(mesh, method, path, no_score, json=body)
        assert status == 403, (method, path, error)
        assert error["code"] == 7  # PERMISSION_DENIED
        assert _error_fields(error) == []
        assert _reason(error) == "MISSING_SCOPE"
    # and nothing was recorded on the way
    status, prediction = await _call(mesh, "GET", f"/v1/predictions/{request_id}", scorer)
    assert (status, prediction["feedback"]) == (200, [])


async def test_another_tenant_cannot_see_or_annotate_the_prediction(
    mesh: RunningGateway, model: bytes
) -> None:
    owner = await mesh.key("acme", "score")
    request_id = await _score(mesh, owner, ROWS)
    await _logged(mesh, owner, request_id)
    stranger = await mesh.key("globex", *ALL_SCOPES)

    status, error = await _call(mesh, "GET", f"/v1/predictions/{request_id}", stranger)
    assert status == 404, error
    assert error["code"] == 5  # NOT_FOUND
    assert request_id in error["message"]
    status, error = await _call(
        mesh, "POST", "/v1/feedback", stranger, json={"requestId": request_id, "label": "spam"}
    )
    assert (status, error["code"]) == (404, 5), error
    status, listed = await _call(mesh, "GET", f"/v1/models/{MODEL}/predictions", stranger)
    assert (status, listed["predictions"]) == (200, [])
    # acme's private model is not there for globex to score either
    status, error = await _call(mesh, "POST", f"/v2/models/{MODEL}/infer", stranger, json=_infer_body(ROWS))
    assert (status, error["code"]) == (404, 5), error

    status, prediction = await _call(mesh, "GET", f"/v1/predictions/{request_id}", owner)
    assert (status, prediction["feedback"]) == (200, [])


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/v1/feedback", b'{"requestId": "r", "label": "x", "colour": "red"}', "feedback.colour"),
        ("POST", "/v1/feedback", b'{"requestId": 7, "label": "x"}', "feedback.request_id"),
        ("POST", "/v1/feedback", b'{"requestId": "r", "tensor": {"shape": "3"}}', "feedback.tensor.shape"),
        ("POST", "/v1/feedback", b'{"requestId": "r", "label": "x"', "body"),
        ("POST", "/v1/feedback", b'{"requestId": "r", "label": "x", "tensor": {}}', "feedback.value"),
        ("POST", "/v1/feedback", b'{"requestId": "r", "label": ""}', "feedback.label"),
        ("POST", "/v1/feedback", b'{"requestId": "", "label": "x"}', "feedback.request_id"),
        ("POST", "/v1/feedback", b"[]", "feedback"),
        ("GET", f"/v1/models/{MODEL}/predictions?pageSize=ten", b"", "page_size"),
        ("GET", f"/v1/models/{MODEL}/predictions?withFeedbackOnly=yes", b"", "with_feedback_only"),
        ("GET", f"/v1/models/{MODEL}/predictions?colour=red", b"", "colour"),
        ("GET", f"/v1/models/{MODEL}/predictions?pageToken=bogus", b"", "page_token"),
        ("GET", "/v1/predictions/r1", b'{"x": 1}', "body"),
        ("POST", f"/v2/models/{MODEL}/infer", b'{"inputs": [], "input": []}', "input"),
        ("POST", f"/v2/models/{MODEL}/infer", b'{"inputs": {}}', "inputs"),
        (
            "POST",
            f"/v2/models/{MODEL}/infer",
            b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": 7, "data": [1, 2, 3, 4]}]}',
            "inputs[0].datatype",
        ),
        (
            "POST",
            f"/v2/models/{MODEL}/infer",
            b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]}',
            "inputs[0].data",
        ),
        (
            "POST",
            f"/v2/models/{MODEL}/infer",
            b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ["a", 2, 3, 4]}]}',
            "inputs[0].data",
        ),
        ("POST", f"/v2/models/{MODEL}/infer", b'{"inputs": [', "body"),
        ("POST", f"/v2/models/{MODEL}/infer", b"\xff\xfe", "body"),
    ],
)
async def test_bad_requests_are_400_naming_the_field(
    mesh: RunningGateway, model: bytes, method: str, path: str, body: bytes, field: str
) -> None:
    headers = {**(await mesh.key("acme", *ALL_SCOPES)), "Content-Type": "application/json"}
    status, error = await _call(mesh, method, path, headers, data=body)
    assert status == 400, (body, error)
    assert error["code"] == 3  # INVALID_ARGUMENT
    assert field in _error_fields(error), error


async def test_a_json_tensor_the_model_cannot_take_is_400_and_the_mesh_keeps_serving(
    mesh: RunningGateway, model: bytes
) -> None:
    headers = await mesh.key("acme", "score")
    wrong_width = _infer_body(np.zeros((1, 5), np.float32))
    wrong_type = _infer_body(np.zeros((1, 4), np.float32))
    wrong_type["inputs"][0]["datatype"] = "INT64"
    wrong_type["inputs"][0]["data"] = [[0, 0, 0, 0]]
    wrong_name = _infer_body(np.zeros((1, 4), np.float32))
    wrong_name["inputs"][0]["name"] = "features"
    for body in (wrong_width, wrong_type, wrong_name):
        status, error = await _call(mesh, "POST", f"/v2/models/{MODEL}/infer", headers, json=body)
        assert status == 400, (body, error)
        assert error["code"] == 3
        assert _error_fields(error), error
    await _score(mesh, headers, ROWS)


async def test_unknown_v2_paths_and_methods_get_the_json_error_too(mesh: RunningGateway) -> None:
    # aiohttp answers these before any handler runs; the gateway words them as its own errors
    status, error = await _call(mesh, "GET", f"/v2/models/{MODEL}/nowhere", {})
    assert (status, error["code"], _reason(error)) == (404, 5, "ROUTE_NOT_FOUND")
    assert _error_fields(error) == []
    async with mesh.http.post(f"{mesh.url}/v2/health/live") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD"
        assert response.content_type == "application/json"
        error = await response.json()
    assert (error["code"], _reason(error)) == (12, "METHOD_NOT_ALLOWED")  # UNIMPLEMENTED
