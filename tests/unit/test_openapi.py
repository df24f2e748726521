"""The gateway's OpenAPI document, checked by the real validator and against the bindings it is
generated from, and the docs page that renders it."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from openapi_spec_validator import validate
from scoremesh.registry.v1 import registry_pb2
from scoremesh.scoring.v1 import scoring_pb2

from services.gateway.http_rules import HttpBinding, bindings_of
from services.gateway.main import SERVICES
from services.gateway.openapi import (
    ERROR_STATUSES,
    UNAUTHENTICATED_PATHS,
    docs_html,
    openapi_document,
    source_comments,
)
from services.mesh import protogen

METHODS = ("get", "put", "post", "delete", "patch")


def _bindings() -> list[HttpBinding]:
    # every service the gateway serves, as it serves them
    return bindings_of(SERVICES.values())


@pytest.fixture(scope="module")
def bindings() -> list[HttpBinding]:
    return _bindings()


@pytest.fixture(scope="module")
def comments(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The protos' comments, through protoc's descriptor set with source info (the same
    include path as the committed stubs)."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("descriptors") / "set.binpb"
    sources = sorted(str(p.relative_to(protogen.PROTOS)) for p in protogen.PROTOS.rglob("*.proto"))
    includes = [f"-I{d}" for d in protogen._include_dirs()]
    args = ["protoc", *includes, "--include_source_info", f"--descriptor_set_out={out}", *sources]
    assert protoc.main(args) == 0
    return source_comments(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()))


@pytest.fixture(scope="module")
def document(bindings: list[HttpBinding], comments: dict[str, str]) -> dict[str, Any]:
    return openapi_document(bindings, title="scoremesh", version="0.1.0", server_url="/", comments=comments)


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def _find(document: dict[str, Any], operation_id: str) -> tuple[str, str, dict[str, Any]]:
    return next(op for op in _operations(document) if op[2]["operationId"] == operation_id)


def _deref(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _template_variables(path: str) -> list[str]:
    return re.findall(r"\{([^}]+)\}", path)


def test_the_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)
    assert json.loads(json.dumps(document)) == document  # served as JSON as it is


def test_the_document_is_valid_without_comments(bindings: list[HttpBinding]) -> None:
    plain = openapi_document(bindings, title="scoremesh", version="0.1.0")
    validate(plain)
    assert "servers" not in plain
    model = plain["components"]["schemas"]["scoremesh.registry.v1.Model"]
    assert model["properties"]["latestVersion"]["description"] == "Latest version."


def test_every_binding_has_its_operation(document: dict[str, Any], bindings: list[HttpBinding]) -> None:
    for binding in bindings:
        service = binding.service.rsplit(".", 1)[-1]
        path, method, operation = _find(document, f"{service}_{binding.method}")
        assert method == binding.http_method.lower()
        assert operation["tags"] == [service]
        # the path is the template, up to the names of its variables (see the next test)
        shape = re.sub(r"\{[^}]+\}", "{}", path)
        assert shape == re.sub(r"\{[^}]+\}", "{}", binding.path.text)
    ids = [op["operationId"] for _, _, op in _operations(document)]
    assert len(ids) == len(set(ids))


def test_custom_verbs_are_kept(document: dict[str, Any]) -> None:
    assert "get" in document["paths"]["/v1/models/{model}:resolve"]
    assert "get" in document["paths"]["/v1/models:watch"]
    assert "get" in document["paths"]["/v1/models/{model}/versions/{version}:download"]


def test_path_parameters_match_the_template_variables(document: dict[str, Any]) -> None:
    for path, _, operation in _operations(document):
        in_path = [p["name"] for p in operation.get("parameters", []) if p["in"] == "path"]
        assert in_path == _template_variables(path), path


def test_templates_that_differ_only_in_names_share_one_path(document: dict[str, Any]) -> None:
    # OpenAPI: templated paths of one hierarchy with different names MUST NOT both exist
    shapes = [re.sub(r"\{[^}]+\}", "{}", path) for path in document["paths"]]
    assert len(shapes) == len(set(shapes))
    path, method, operation = _find(document, "ModelRegistry_UpdateModel")
    assert (path, method) == ("/v1/models/{name}", "patch")
    (name,) = [p for p in operation["parameters"] if p["in"] == "path"]
    assert "model.name" in name["description"]
    path, _, _ = _find(document, "ModelRegistry_UpdateModelCard")
    assert path == "/v1/models/{model}/versions/{version}/card"


def test_a_nested_variable_keeps_its_dotted_name(document: dict[str, Any]) -> None:
    path, _, operation = _find(document, "ModelRegistry_UploadVersion")
    assert path == "/v1/models/{metadata.model}/versions:upload"
    assert [p["name"] for p in operation["parameters"] if p["in"] == "path"] == ["metadata.model"]


def test_path_parameters_are_typed_from_the_field(document: dict[str, Any]) -> None:
    _, _, operation = _find(document, "ModelRegistry_GetVersion")
    schemas = {p["name"]: p["schema"] for p in operation["parameters"]}
    assert schemas["model"]["type"] == "string"
    assert schemas["version"] == {"type": "integer", "format": "int64"}


def test_query_parameters_are_the_free_scalar_fields(document: dict[str, Any]) -> None:
    def query(operation_id: str) -> dict[str, dict[str, Any]]:
        _, _, operation = _find(document, operation_id)
        return {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "query"}

    assert set(query("ModelRegistry_ListModels")) == {"pageSize", "pageToken"}
    assert set(query("Scoring_ListPredictions")) == {"version", "withFeedbackOnly", "pageSize", "pageToken"}
    assert set(query("ModelRegistry_DeleteAlias")) == {"expectedVersion"}
    assert set(query("ModelRegistry_ResolveModel")) == {"version", "alias"}
    assert query("ModelRegistry_GetModel") == {}
    models = query("ModelRegistry_WatchModels")["models"]
    assert models["schema"] == {"type": "array", "items": {"type": "string"}}
    assert (models["style"], models["explode"]) == ("form", True)
    # a field beside the body is still set by the query: the update mask of a PATCH
    assert set(query("ModelRegistry_UpdateModel")) == {"updateMask"}
    assert query("ModelRegistry_UpdateModel")["updateMask"]["schema"]["type"] == "string"  # a FieldMask
    # the whole message is the body: nothing left for the query
    assert query("ModelRegistry_SetAlias") == {}


def test_request_bodies(document: dict[str, Any]) -> None:
    _, _, create = _find(document, "ModelRegistry_CreateModel")
    schema = create["requestBody"]["content"]["application/json"]["schema"]
    assert schema["$ref"] == "#/components/schemas/scoremesh.registry.v1.Model"
    _, _, set_alias = _find(document, "ModelRegistry_SetAlias")
    schema = set_alias["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/scoremesh.registry.v1.SetAliasRequest"}
    _, _, get = _find(document, "ModelRegistry_GetModel")
    assert "requestBody" not in get


def test_streams_are_ndjson_and_the_upload_is_octet_stream(document: dict[str, Any]) -> None:
    for operation_id, message in (
        ("ModelRegistry_DownloadVersion", "DownloadVersionResponse"),
        ("ModelRegistry_WatchModels", "WatchModelsResponse"),
    ):
        _, _, operation = _find(document, operation_id)
        content = operation["responses"]["200"]["content"]
        assert list(content) == ["application/x-ndjson"]
        assert content["application/x-ndjson"]["schema"]["$ref"].endswith(f".{message}")
    _, _, upload = _find(document, "ModelRegistry_UploadVersion")
    assert list(upload["requestBody"]["content"]) == ["application/octet-stream"]
    query = {p["name"] for p in upload["parameters"] if p["in"] == "query"}
    assert query == {"sha256", "sizeBytes", "alias", "description"}
    assert list(upload["responses"]["200"]["content"]) == ["application/json"]


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    assert refs
    for ref in set(refs):
        assert ref.startswith("#/")
        _deref(document, {"$ref": ref})  # KeyError when it does not resolve


def test_message_schemas_follow_proto3_json(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    version = schemas["scoremesh.registry.v1.ModelVersion"]["properties"]
    for name in ("version", "sizeBytes"):
        assert version[name]["type"] == "string"
        assert version[name]["format"] == "int64"
    assert version["createTime"]["type"] == "string"
    assert version["createTime"]["format"] == "date-time"
    assert version["status"]["$ref"] == "#/components/schemas/scoremesh.registry.v1.VersionStatus"
    assert schemas["scoremesh.registry.v1.VersionStatus"]["enum"] == [
        "VERSION_STATUS_UNSPECIFIED",
        "READY",
        "FAILED",
    ]
    shape = schemas["scoremesh.registry.v1.TensorSpec"]["properties"]["shape"]
    assert shape["type"] == "array"
    assert shape["items"]["type"] == "string"
    card = schemas["scoremesh.registry.v1.ModelCard"]["properties"]
    assert card["metrics"]["type"] == "object"
    assert card["metrics"]["additionalProperties"] is True
    metrics = schemas["scoremesh.registry.v1.Threshold"]["properties"]["metrics"]
    assert metrics["type"] == "object"
    assert metrics["additionalProperties"]["type"] == "number"
    chunk = schemas["scoremesh.registry.v1.DownloadVersionResponse"]["properties"]["chunk"]
    assert chunk["contentEncoding"] == "base64"
    # lowerCamel names, as the gateway's responses print them
    assert "latestVersion" in schemas["scoremesh.registry.v1.Model"]["properties"]


def test_every_int64_field_is_a_string(document: dict[str, Any]) -> None:
    for message in (registry_pb2, scoring_pb2):
        for descriptor in message.DESCRIPTOR.message_types_by_name.values():
            schema = document["components"]["schemas"].get(descriptor.full_name)
            if schema is None:
                continue  # a message no route reaches
            for field in descriptor.fields:
                if field.type in (field.TYPE_INT64, field.TYPE_UINT64):
                    prop = schema["properties"][field.json_name]
                    assert (prop.get("items") or prop)["type"] == "string", field.full_name


def test_oneofs_are_documented(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    feedback = schemas["scoremesh.scoring.v1.Feedback"]
    assert feedback["x-oneofs"] == {"value": ["label", "tensor"]}
    assert "Oneof `value`: at most one of `label`, `tensor`." in feedback["description"]
    assert "not with `tensor`" in feedback["properties"]["label"]["description"]
    # a proto3 `optional` is a synthetic oneof, not a choice
    assert "x-oneofs" not in schemas["scoremesh.registry.v1.SetAliasRequest"]


def test_comments_become_descriptions(document: dict[str, Any], comments: dict[str, str]) -> None:
    model = document["components"]["schemas"]["scoremesh.registry.v1.Model"]
    assert model["description"] == "A named model: a sequence of versions owned by one tenant."
    assert model["properties"]["tenant"]["readOnly"] is True
    visibility = document["components"]["schemas"]["scoremesh.registry.v1.Visibility"]
    assert "`PUBLIC`: Every tenant sees" in visibility["description"]
    _, _, get = _find(document, "ModelRegistry_GetModel")
    assert get["description"].startswith("Gets one model.")
    tags = {t["name"]: t["description"] for t in document["tags"]}
    assert tags["ModelRegistry"].startswith("Models and their versions.")
    # a comment that wraps over lines reads as one paragraph
    assert "\n" not in comments["scoremesh.registry.v1.ModelRegistry.UploadVersion"]


def test_a_recursive_message_is_a_ref_to_itself() -> None:
    # DescriptorProto holds itself (nested_type): it must end in a $ref, not recurse forever
    recursive = descriptor_pb2.DescriptorProto.DESCRIPTOR
    binding = next(b for b in _bindings() if b.method == "GetModel")
    document = openapi_document([dataclasses.replace(binding, output_type=recursive)], title="t", version="1")
    validate(document)
    nested = document["components"]["schemas"][recursive.full_name]["properties"]["nestedType"]
    assert nested["items"] == {"$ref": f"#/components/schemas/{recursive.full_name}"}


def test_every_operation_documents_the_error_body(document: dict[str, Any]) -> None:
    error = document["components"]["schemas"]["Error"]
    assert set(error["properties"]) == {"code", "message", "details"}
    assert error["properties"]["code"]["type"] == "integer"
    assert error["properties"]["details"]["items"]["type"] == "object"
    for path, method, operation in _operations(document):
        for status in ERROR_STATUSES:
            response = _deref(document, operation["responses"][str(status)])
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, status)


def test_the_oip_paths_are_hand_written(document: dict[str, Any]) -> None:
    paths = document["paths"]
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}"):
        assert "get" in paths[path]
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        assert "get" in paths[f"{prefix}/ready"]
        infer = paths[f"{prefix}/infer"]["post"]
        assert infer["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/oip.InferenceRequest"
        }
        response = infer["responses"]["200"]["content"]["application/json"]["schema"]
        assert response == {"$ref": "#/components/schemas/oip.InferenceResponse"}
        assert paths[f"{prefix}/infer"]["x-scoremesh-hand-written"] is True
    request_input = document["components"]["schemas"]["oip.RequestInput"]
    assert set(request_input["required"]) == {"name", "shape", "datatype", "data"}
    assert all("x-scoremesh-hand-written" not in item for p, item in paths.items() if p.startswith("/v1/"))


def test_security_is_bearer_everywhere_but_health_and_docs(document: dict[str, Any]) -> None:
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert document["security"] == [{"bearerAuth": []}]
    open_paths = set()
    for path, _, operation in _operations(document):
        effective = operation.get("security", document["security"])
        if path in UNAUTHENTICATED_PATHS:
            assert effective == []
            open_paths.add(path)
        else:
            assert effective == [{"bearerAuth": []}], path
    assert open_paths == {"/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs", "/healthz"}


def test_two_bindings_of_one_route_are_refused(bindings: list[HttpBinding]) -> None:
    with pytest.raises(ValueError, match="two bindings"):
        openapi_document([bindings[0], bindings[0]], title="t", version="1")


def test_the_docs_page_fetches_nothing_from_another_host() -> None:
    html = docs_html()
    assert re.search(r"https?://", html) is None
    assert re.search(r"<(script|link|img|iframe)[^>]*(src|href)=", html) is None
    assert 'const SPEC_URL = "/openapi.json";' in html
    # the URL is a JSON string in the script: it cannot end the script element
    assert docs_html("/x</script><script>alert(1)//").count("</script>") == 1


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to parse the page's script")
def test_the_docs_script_parses(tmp_path: Path) -> None:
    script = docs_html().split("<script>", 1)[1].rsplit("</script>", 1)[0]
    source = tmp_path / "docs.js"
    source.write_text(script)
    result = subprocess.run(["node", "--check", str(source)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
