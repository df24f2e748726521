"""REST ↔ gRPC transcoding from the protos' google.api.http rules: routes, request building,
uploads, response JSON, and the HTTP face of every error."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scoremesh.registry.v1 import registry_pb2
from scoremesh.scoring.v1 import scoring_pb2

from services.gateway.http_errors import (
    HTTP_STATUS,
    MethodNotAllowed,
    PayloadTooLarge,
    Unimplemented,
    UnsupportedMediaType,
    error_body,
    error_response,
    http_status,
    ndjson_error,
    payload_too_large,
)
from services.gateway.http_rules import HttpBinding, bindings_of
from services.gateway.transcoding import (
    MAX_CHUNK_BYTES,
    Router,
    build_request,
    build_upload_messages,
    ndjson_line,
    response_json,
    upload_shape,
)
from services.mesh.errors import FieldViolation, InvalidArgument, MeshError, NotFound
from services.mesh.status import RemoteError, to_status

BINDINGS = bindings_of(
    [
        registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"],
        scoring_pb2.DESCRIPTOR.services_by_name["Scoring"],
    ]
)
ROUTER = Router(BINDINGS)


def _binding(method: str) -> HttpBinding:
    return next(b for b in BINDINGS if b.method == method)


def _request(
    method: str,
    path: str,
    query: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    content_type: str | None = "application/json",
) -> Message:
    match = ROUTER.match(method, path)
    return build_request(match.binding, match.path_vars, list(query), body, content_type)


def _violations(caught: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in caught.value.violations]


# Routing

ROUTES = [
    ("POST", "/v1/models", "CreateModel", {}),
    ("GET", "/v1/models/fraud", "GetModel", {"name": "fraud"}),
    ("GET", "/v1/models", "ListModels", {}),
    ("PATCH", "/v1/models/fraud", "UpdateModel", {"model.name": "fraud"}),
    ("POST", "/v1/models/fraud/versions:upload", "UploadVersion", {"metadata.model": "fraud"}),
    ("GET", "/v1/models/fraud/versions/3", "GetVersion", {"model": "fraud", "version": "3"}),
    ("GET", "/v1/models/fraud/versions", "ListVersions", {"model": "fraud"}),
    ("GET", "/v1/models/fraud/versions/3:download", "DownloadVersion", {"model": "fraud", "version": "3"}),
    ("PUT", "/v1/models/fraud/aliases/prod", "SetAlias", {"model": "fraud", "alias": "prod"}),
    ("DELETE", "/v1/models/fraud/aliases/prod", "DeleteAlias", {"model": "fraud", "alias": "prod"}),
    ("GET", "/v1/models/fraud/aliases", "ListAliases", {"model": "fraud"}),
    ("GET", "/v1/models/fraud/aliasChanges", "ListAliasChanges", {"model": "fraud"}),
    ("GET", "/v1/models/fraud/versions/3/card", "GetModelCard", {"model": "fraud", "version": "3"}),
    (
        "PUT",
        "/v1/models/fraud/versions/3/card",
        "UpdateModelCard",
        {"card.model": "fraud", "card.version": "3"},
    ),
    ("GET", "/v1/models/fraud:resolve", "ResolveModel", {"model": "fraud"}),
    ("GET", "/v1/models:watch", "WatchModels", {}),
    ("POST", "/v1/feedback", "CreateFeedback", {}),
    ("GET", "/v1/predictions/req-1", "GetPrediction", {"request_id": "req-1"}),
    ("GET", "/v1/models/fraud/predictions", "ListPredictions", {"model": "fraud"}),
]


def test_the_routes_cover_every_binding() -> None:
    assert len(BINDINGS) == 19
    assert sorted(r[2] for r in ROUTES) == sorted(b.method for b in BINDINGS)


@pytest.mark.parametrize(("method", "path", "rpc", "variables"), ROUTES)
def test_every_binding_is_routed(method: str, path: str, rpc: str, variables: dict[str, str]) -> None:
    match = ROUTER.match(method, path)
    assert (match.binding.method, dict(match.path_vars)) == (rpc, variables)


def test_a_custom_verb_beats_a_variable_that_would_swallow_it() -> None:
    assert ROUTER.match("GET", "/v1/models/fraud:resolve").binding.method == "ResolveModel"
    # without a known verb the colon is part of the name
    assert ROUTER.match("GET", "/v1/models/fraud:other").path_vars == {"name": "fraud:other"}


def test_a_literal_segment_beats_a_variable() -> None:
    literal = Router(BINDINGS)
    # /v1/models:watch is literal all through; {name} never sees "models:watch"
    assert literal.match("GET", "/v1/models:watch").binding.method == "WatchModels"
    # /v1/models/{model}/aliasChanges over /v1/models/{model}/versions/{version} shapes
    assert literal.match("GET", "/v1/models/m/aliasChanges").binding.method == "ListAliasChanges"


def test_literals_win_over_variables_whatever_the_declaration_order() -> None:
    get_model, list_aliases = _binding("GetModel"), _binding("ListAliases")
    # a template whose second segment is a variable, declared first, must lose to a literal
    for order in ([get_model, list_aliases], [list_aliases, get_model]):
        router = Router(order)
        assert router.match("GET", "/v1/models/x").binding.method == "GetModel"


def test_path_segments_are_percent_decoded_after_splitting() -> None:
    match = ROUTER.match("GET", "/v1/models/a%2Fb%3Aresolve")
    assert (match.binding.method, match.path_vars) == ("GetModel", {"name": "a/b:resolve"})
    assert ROUTER.match("GET", "/v1/models/caf%C3%A9:resolve").path_vars == {"model": "café"}


def test_a_variable_that_is_not_utf8_names_its_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        ROUTER.match("GET", "/v1/models/%FF")
    assert _violations(caught) == ["name"]


@pytest.mark.parametrize(
    "path", ["/v2/models", "/v1/models/", "/v1//models", "v1/models", "", "/", "/v1/models/a/b/c/d/e/f/g"]
)
def test_a_path_no_template_fits_is_not_found(path: str) -> None:
    with pytest.raises(NotFound) as caught:
        ROUTER.match("GET", path)
    assert error_response(caught.value).status == 404


def test_another_method_on_a_known_path_is_405_with_allow() -> None:
    with pytest.raises(MethodNotAllowed) as caught:
        ROUTER.match("POST", "/v1/models/m/aliases/prod")
    response = error_response(caught.value)
    assert response.status == 405
    assert response.headers == {"Allow": "DELETE, PUT"}
    assert json.loads(response.body)["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]


def test_methods_are_case_insensitive() -> None:
    assert ROUTER.match("get", "/v1/models").binding.method == "ListModels"


def test_a_template_naming_no_field_fails_at_start_up() -> None:
    broken = _binding("GetModel")
    template = type(broken.path).parse("/v1/models/{nope}")
    with pytest.raises(ValueError, match="nope"):
        Router([HttpBinding(**{**_fields(broken), "path": template})])


def _fields(binding: HttpBinding) -> dict[str, Any]:
    return {name: getattr(binding, name) for name in HttpBinding.__slots__}


# Requests: path variables


def test_path_variables_set_nested_fields_and_convert_types() -> None:
    request = _request("PUT", "/v1/models/fraud/versions/7/card", body=b'{"description": "d"}')
    assert request == registry_pb2.UpdateModelCardRequest(
        card=registry_pb2.ModelCard(model="fraud", version=7, description="d")
    )


def test_a_path_variable_of_the_wrong_type_names_its_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        _request("GET", "/v1/models/fraud/versions/seven")
    assert _violations(caught) == ["version"]
    assert "expected an integer" in caught.value.message


def test_the_path_overrides_the_body_for_the_same_field() -> None:
    request = _request("PATCH", "/v1/models/fraud", body=b'{"name": "other", "description": "d"}')
    assert request == registry_pb2.UpdateModelRequest(model=registry_pb2.Model(name="fraud", description="d"))


# Requests: bodies


def test_body_star_reads_the_whole_message_in_either_naming() -> None:
    camel = _request("PUT", "/v1/models/m/aliases/prod", body=b'{"version": "3", "expectedVersion": 2}')
    snake = _request("PUT", "/v1/models/m/aliases/prod", body=b'{"version": 3, "expected_version": "2"}')
    expected = registry_pb2.SetAliasRequest(model="m", alias="prod", version=3, expected_version=2)
    assert camel == snake == expected


def test_a_body_field_reads_that_field() -> None:
    body = json.dumps({"name": "fraud", "visibility": "PUBLIC", "description": "d"}).encode()
    request = _request("POST", "/v1/models", body=body)
    assert request == registry_pb2.CreateModelRequest(
        model=registry_pb2.Model(name="fraud", visibility=registry_pb2.PUBLIC, description="d")
    )


def test_an_absent_body_leaves_the_body_field_empty() -> None:
    assert _request("POST", "/v1/feedback", body=None) == scoring_pb2.CreateFeedbackRequest()
    assert _request("POST", "/v1/feedback", body=b"") == scoring_pb2.CreateFeedbackRequest()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"name": "m"', "body"),  # malformed
        (b"\xff\xfe", "body"),  # not UTF-8
        (b"[1, 2]", "body"),  # body * must be an object
        (b'{"version": NaN}', "body"),
        (b'{"version": "three"}', "version"),  # wrong type
        (b'{"version": 1.5}', "version"),
        (b'{"version": "99999999999999999999999"}', "version"),
        (b'{"bogus": 1}', "bogus"),  # unknown field
        (b'{"alias": "x", "alias": "y"}', "alias"),  # duplicate key
        (b'{"expectedVersion": []}', "expected_version"),
    ],
)
def test_bad_json_bodies_are_invalid_arguments_naming_the_field(body: bytes, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _request("PUT", "/v1/models/m/aliases/prod", body=body)
    assert _violations(caught) == [field]
    assert error_response(caught.value).status == 400


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"latestVersion": "x"}', "model.latest_version"),
        (b'{"visibility": "SECRET"}', "model.visibility"),
        (b'{"createTime": "yesterday"}', "model.create_time"),
        (b'{"name": 3}', "model.name"),
        (b'{"nested": {"deep": 1}}', "model.nested"),
    ],
)
def test_errors_inside_a_body_field_carry_its_path(body: bytes, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _request("POST", "/v1/models", body=body)
    assert _violations(caught) == [field]


def test_deep_errors_in_repeated_and_map_fields_name_the_path() -> None:
    body = b'{"thresholds": [{"output": "o", "metrics": {"recall": "high"}}]}'
    with pytest.raises(InvalidArgument) as caught:
        _request("PUT", "/v1/models/m/versions/1/card", body=body)
    assert _violations(caught) == ["card.thresholds.metrics"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        # json_format leaves a oneof member's own name out of its message: the path has it
        (b'{"requestId": "r", "tensor": {"shape": "3"}}', "feedback.tensor.shape"),
        (b'{"tensor": {"shape": ["a"]}}', "feedback.tensor.shape"),
        (b'{"tensor": {"bogus": 1}}', "feedback.tensor.bogus"),
        (b'{"tensor": 5}', "feedback.tensor"),
        (b'{"label": 7}', "feedback.label"),
        (b'{"bogus": 1, "tensor": 5}', "feedback.bogus"),  # the first bad field, as json_format reads
    ],
)
def test_errors_inside_a_oneof_member_name_the_member(body: bytes, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _request("POST", "/v1/feedback", body=body)
    assert _violations(caught) == [field]


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"7", b"[[1]]", b"true"])
def test_a_body_field_that_is_a_message_must_be_an_object(body: bytes) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _request("POST", "/v1/feedback", body=body)
    assert _violations(caught) == ["feedback"]
    assert "must be a JSON object" in caught.value.violations[0].description


def test_two_members_of_a_oneof_name_the_oneof() -> None:
    with pytest.raises(InvalidArgument) as caught:
        _request("POST", "/v1/feedback", body=b'{"label": "fraud", "tensor": {"name": "t"}}')
    assert _violations(caught) == ["feedback.value"]


def test_a_body_on_a_rule_without_one_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as caught:
        _request("GET", "/v1/models/fraud", body=b"{}")
    assert _violations(caught) == ["body"]


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8", "application/merge+json"])
def test_json_media_types_are_read(content_type: str | None) -> None:
    request = _request("POST", "/v1/models", body=b'{"name": "m"}', content_type=content_type)
    assert request == registry_pb2.CreateModelRequest(model=registry_pb2.Model(name="m"))


def test_other_media_types_are_415() -> None:
    with pytest.raises(UnsupportedMediaType) as caught:
        _request("POST", "/v1/models", body=b"name=m", content_type="application/x-www-form-urlencoded")
    assert error_response(caught.value).status == 415


# Requests: query parameters


def test_query_parameters_fill_scalars_repeated_fields_and_bools() -> None:
    query = [("models", "a"), ("models", "b"), ("fromBeginning", "true"), ("cursor", "c1")]
    request = _request("GET", "/v1/models:watch", query)
    assert request == registry_pb2.WatchModelsRequest(cursor="c1", models=["a", "b"], from_beginning=True)


def test_query_parameters_take_snake_and_camel_names_and_convert_ints() -> None:
    snake = _request("GET", "/v1/models/m/predictions", [("page_size", "5"), ("with_feedback_only", "false")])
    camel = _request("GET", "/v1/models/m/predictions", [("pageSize", "5"), ("withFeedbackOnly", "false")])
    assert snake == camel == scoring_pb2.ListPredictionsRequest(model="m", page_size=5)


def test_query_parameters_set_field_masks_and_oneof_members() -> None:
    request = _request(
        "PATCH", "/v1/models/m", [("updateMask", "description,visibility")], body=b'{"visibility": "PUBLIC"}'
    )
    assert request == registry_pb2.UpdateModelRequest(
        model=registry_pb2.Model(name="m", visibility=registry_pb2.PUBLIC),
        update_mask=field_mask_pb2.FieldMask(paths=["description", "visibility"]),
    )
    resolve = _request("GET", "/v1/models/m:resolve", [("alias", "prod")])
    assert resolve == registry_pb2.ResolveModelRequest(model="m", alias="prod")


def test_query_parameters_set_nested_enums_by_name_and_bytes_from_base64() -> None:
    # no request of today's protos has these in its query; a rule without a body shows them
    create = HttpBinding(**{**_fields(_binding("CreateModel")), "body": ""})
    query = [("model.visibility", "PUBLIC"), ("model.latestVersion", "-2")]
    model = build_request(create, {}, query, None, None)
    assert model == registry_pb2.CreateModelRequest(
        model=registry_pb2.Model(visibility=registry_pb2.PUBLIC, latest_version=-2)
    )
    upload = HttpBinding(**{**_fields(_binding("UploadVersion")), "body": "", "client_streaming": False})
    chunk = build_request(upload, {}, [("chunk", base64.b64encode(b"\x00\xff").decode())], None, None)
    assert chunk == registry_pb2.UploadVersionRequest(chunk=b"\x00\xff")
    with pytest.raises(InvalidArgument) as caught:
        build_request(create, {}, [("model.visibility", "SECRET")], None, None)
    assert _violations(caught) == ["model.visibility"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ([("pageSize", "ten")], "page_size"),  # violations name proto paths
        ([("page_size", "1"), ("page_size", "2")], "page_size"),  # not repeated
        ([("withFeedbackOnly", "yes")], "with_feedback_only"),
        ([("nope", "1")], "nope"),
        ([("model", "other")], "model"),  # bound by the path
        ([("model.name", "x")], "model.name"),  # model is a string: nothing inside
    ],
)
def test_bad_query_parameters_name_the_parameter(query: list[tuple[str, str]], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _request("GET", "/v1/models/m/predictions", query)
    assert _violations(caught) == [field]


def test_a_query_parameter_cannot_set_what_a_body_sets() -> None:
    with pytest.raises(InvalidArgument) as caught:
        _request("POST", "/v1/models", [("model.description", "d")], body=b"{}")
    assert _violations(caught) == ["model.description"]
    with pytest.raises(InvalidArgument) as star:
        _request("PUT", "/v1/models/m/aliases/prod", [("version", "3")], body=b"{}")
    assert _violations(star) == ["version"]


def test_a_query_parameter_cannot_set_a_whole_message() -> None:
    with pytest.raises(InvalidArgument) as caught:
        _request("POST", "/v1/feedback", [("feedback", "x")])
    assert _violations(caught) == ["feedback"]


# Uploads


async def _chunks(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def _collect(stream: AsyncIterator[Message]) -> list[Message]:
    return [message async for message in stream]


async def test_an_upload_sends_metadata_then_the_body_in_chunks() -> None:
    match = ROUTER.match("POST", "/v1/models/fraud/versions:upload")
    body = bytes(range(256)) * (MAX_CHUNK_BYTES // 256 * 2 + 3)
    pieces = [body[i : i + 100_000] for i in range(0, len(body), 100_000)]
    stream = build_upload_messages(
        match.binding,
        match.path_vars,
        [("sha256", "ab" * 32), ("metadata.size_bytes", str(len(body))), ("alias", "staging")],
        _chunks(*pieces),
        content_type="application/octet-stream",
    )
    messages = await _collect(stream)
    expected_metadata = registry_pb2.UploadVersionMetadata(
        model="fraud", sha256="ab" * 32, size_bytes=len(body), alias="staging"
    )
    assert messages[0] == registry_pb2.UploadVersionRequest(metadata=expected_metadata)
    chunks = [m.chunk for m in messages[1:]]  # type: ignore[attr-defined]
    assert [len(c) for c in chunks] == [MAX_CHUNK_BYTES, MAX_CHUNK_BYTES, 3 * 256]
    assert b"".join(chunks) == body


async def test_an_empty_upload_still_sends_its_metadata() -> None:
    match = ROUTER.match("POST", "/v1/models/fraud/versions:upload")
    messages = await _collect(build_upload_messages(match.binding, match.path_vars, [], _chunks()))
    assert messages == [
        registry_pb2.UploadVersionRequest(metadata=registry_pb2.UploadVersionMetadata(model="fraud"))
    ]


def test_bad_upload_metadata_fails_before_any_call() -> None:
    match = ROUTER.match("POST", "/v1/models/fraud/versions:upload")
    cases = [
        # violations name the proto path, metadata being a member of the payload oneof
        ([("size_bytes", "big")], "metadata.size_bytes"),
        ([("metadata.sizeBytes", "big")], "metadata.size_bytes"),
        ([("chunk", "AA==")], "chunk"),
    ]
    for query, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            build_upload_messages(match.binding, match.path_vars, query, _chunks())
        assert _violations(caught) == [field]
    with pytest.raises(UnsupportedMediaType):
        build_upload_messages(match.binding, match.path_vars, [], _chunks(), content_type="application/json")


def test_only_uploads_stream_requests_over_rest() -> None:
    upload = _binding("UploadVersion")
    assert upload_shape(upload) is not None
    assert upload_shape(_binding("GetModel")) is None
    with pytest.raises(Unimplemented) as unary_builder:
        build_request(upload, {}, [], None, None)
    assert http_status(unary_builder.value) == 501
    # a client-streaming RPC whose request is no metadata|chunk oneof
    other = HttpBinding(**{**_fields(_binding("GetModel")), "client_streaming": True})
    with pytest.raises(Unimplemented):
        build_upload_messages(other, {"name": "m"}, [], _chunks())


# Responses


def test_responses_are_proto3_json_with_lower_camel_names_and_defaults() -> None:
    model = registry_pb2.Model(name="fraud", latest_version=3, visibility=registry_pb2.PUBLIC)
    document = json.loads(response_json(_binding("GetModel"), model))
    assert document["name"] == "fraud"
    assert document["latestVersion"] == "3"  # int64 as a string, per proto3 JSON
    assert document["visibility"] == "PUBLIC"
    assert document["createdBy"] == ""  # defaults printed
    empty = json.loads(response_json(_binding("ListAliases"), registry_pb2.ListAliasesResponse()))
    assert empty == {"aliases": []}


def test_response_body_returns_only_that_field() -> None:
    binding = HttpBinding(**{**_fields(_binding("ResolveModel")), "response_body": "version"})
    response = registry_pb2.ResolveModelResponse(
        version=registry_pb2.ModelVersion(model="m", version=2), alias="prod"
    )
    document = json.loads(response_json(binding, response))
    assert (document["model"], document["version"]) == ("m", "2")
    scalar = HttpBinding(**{**_fields(_binding("ResolveModel")), "response_body": "alias"})
    assert json.loads(response_json(scalar, response)) == "prod"


def test_server_streams_are_one_json_object_per_line() -> None:
    binding = _binding("WatchModels")
    events = [
        registry_pb2.WatchModelsResponse(cursor="1", model="a\nb", type=registry_pb2.VERSION_CREATED),
        registry_pb2.WatchModelsResponse(cursor="2", model="c", type=registry_pb2.ALIAS_SET),
    ]
    stream = b"".join(ndjson_line(binding, event) for event in events)
    lines = stream.split(b"\n")
    assert lines[-1] == b""
    parsed = [json.loads(line) for line in lines[:-1]]
    assert [(p["cursor"], p["model"], p["type"]) for p in parsed] == [
        ("1", "a\nb", "VERSION_CREATED"),
        ("2", "c", "ALIAS_SET"),
    ]


# Errors


def test_every_grpc_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert {code.name: status for code, status in HTTP_STATUS.items()} == {
        "OK": 200,
        "CANCELLED": 499,
        "UNKNOWN": 500,
        "INVALID_ARGUMENT": 400,
        "DEADLINE_EXCEEDED": 504,
        "NOT_FOUND": 404,
        "ALREADY_EXISTS": 409,
        "PERMISSION_DENIED": 403,
        "UNAUTHENTICATED": 401,
        "RESOURCE_EXHAUSTED": 429,
        "FAILED_PRECONDITION": 400,
        "ABORTED": 409,
        "OUT_OF_RANGE": 400,
        "UNIMPLEMENTED": 501,
        "INTERNAL": 500,
        "UNAVAILABLE": 503,
        "DATA_LOSS": 500,
    }


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_errors_of_every_code_keep_code_and_status(code: grpc.StatusCode) -> None:
    error = RemoteError("boom", code_name=code.name)
    response = error_response(error)
    assert response.status == HTTP_STATUS[code]
    assert json.loads(response.body)["code"] == code.value[0]


def test_the_error_body_carries_error_info_and_field_violations() -> None:
    error = InvalidArgument(
        "bad upload",
        violations=[FieldViolation("metadata.sha256", "not hex"), FieldViolation("size_bytes", "< 0")],
        reason="BAD_UPLOAD",
        metadata={"model": "fraud"},
    )
    assert error_body(error) == {
        "code": 3,
        "message": "bad upload",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "BAD_UPLOAD",
                "domain": "scoremesh",
                "metadata": {"model": "fraud"},
            },
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [
                    {"field": "metadata.sha256", "description": "not hex"},
                    {"field": "size_bytes", "description": "< 0"},
                ],
            },
        ],
    }


def test_a_failed_grpc_call_keeps_its_code_and_details() -> None:
    status = to_status(NotFound("model 'x' not found", reason="MODEL_NOT_FOUND"))
    failed = grpc.aio.AioRpcError(
        status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), status.details, ""
    )
    response = error_response(failed)
    body = json.loads(response.body)
    assert response.status == 404
    assert (body["code"], body["message"]) == (5, "model 'x' not found")
    assert body["details"][0]["reason"] == "MODEL_NOT_FOUND"


def test_bodies_over_the_limit_are_413() -> None:
    response = payload_too_large(1024)
    body = json.loads(response.body)
    assert response.status == 413
    assert body["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert body["details"][0]["metadata"] == {"limit_bytes": "1024"}
    assert http_status(PayloadTooLarge(1)) == 413


def test_a_stream_that_fails_midway_ends_with_an_error_line() -> None:
    line = ndjson_error(NotFound("gone"))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line)["error"]["code"] == 5


# Bad input never escapes as anything but a domain error

METHODS = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "get"])
SEGMENTS = st.sampled_from(
    ["v1", "models", "versions", "aliases", "card", "x", "3", ":resolve", "%FF", "%2F"]
)
PATHS = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(SEGMENTS, st.text(max_size=8)), max_size=7).map(lambda s: "/" + "/".join(s)),
)
QUERY = st.lists(
    st.tuples(
        st.sampled_from(["pageSize", "models", "version", "alias", "x.y", "card.version", ""]), st.text()
    ),
    max_size=4,
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from(
    ["name", "version", "alias", "model", "metrics", "thresholds", "label", "tensor", "expectedVersion"]
)
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=4).map(lambda d: json.dumps(d).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n),
)


def _transcode(method: str, path: str, query: list[tuple[str, str]], body: bytes) -> int:
    """The HTTP status the request gets before any call: 200 when it transcodes."""
    try:
        match = ROUTER.match(method, path)
        if match.binding.client_streaming:
            build_upload_messages(match.binding, match.path_vars, query, _chunks(body))
        else:
            build_request(match.binding, match.path_vars, query, body, "application/json")
    except MeshError as err:  # anything else escapes and fails the test
        return error_response(err).status
    return 200


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=METHODS, path=PATHS, query=QUERY, body=BODIES)
def test_arbitrary_requests_raise_only_domain_errors(
    method: str, path: str, query: list[tuple[str, str]], body: bytes
) -> None:
    status = _transcode(method, path, query, body)
    assert status == 200 or 400 <= status < 500  # bad input is never a 5xx


@settings(max_examples=400, deadline=None)
@given(route=st.sampled_from(ROUTES), query=QUERY, body=BODIES)
def test_arbitrary_bodies_on_every_route_raise_only_domain_errors(
    route: tuple[str, str, str, dict[str, str]], query: list[tuple[str, str]], body: bytes
) -> None:
    status = _transcode(route[0], route[1], query, body)
    assert status == 200 or 400 <= status < 500
