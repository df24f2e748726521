"""The REST surface of the mesh as the protos declare it: every RPC's ``google.api.http`` rule,
read from the service descriptors at start-up.

This is the gateway's one source of routes, and of the OpenAPI document: adding an RPC with an
annotation to a proto makes it reachable with no gateway change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor

__all__ = ["HttpBinding", "PathTemplate", "bindings_of"]

_VERBS: Final = ("get", "put", "post", "delete", "patch")
# a path segment variable: {name} or {model.name}, optionally with a pattern ({name=models/*})
_VARIABLE: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?:=([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """``/v1/models/{model}/versions/{version}:download`` split into its literal segments, its
    variables (field paths of the request message) and its custom verb (``download``)."""

    text: str
    segments: tuple[str, ...]
    """Each segment: a literal, or ``{field.path}`` for a variable."""
    variables: tuple[str, ...]
    verb: str

    @classmethod
    def parse(cls, text: str) -> PathTemplate:
        if not text.startswith("/"):
            raise ValueError(f"path template {text!r} must start with '/'")
        path, verb = text, ""
        last = text.rsplit("/", 1)[-1]
        if ":" in last and not last.endswith("}"):
            path, _, verb = text.rpartition(":")
        segments: list[str] = []
        variables: list[str] = []
        for segment in path.strip("/").split("/"):
            match = _VARIABLE.fullmatch(segment)
            if match:
                if match.group(2) not in (None, "*"):
                    raise ValueError(f"path template {text!r}: only single-segment variables are supported")
                variables.append(match.group(1))
                segments.append("{" + match.group(1) + "}")
            elif "{" in segment or "}" in segment:
                raise ValueError(f"path template {text!r}: a variable must be a whole segment")
            else:
                segments.append(segment)
        return cls(text, tuple(segments), tuple(variables), verb)


@dataclass(frozen=True, slots=True)
class HttpBinding:
    """One REST route to one RPC."""

    service: str
    """The full service name (``scoremesh.registry.v1.ModelRegistry``)."""
    method: str
    """The RPC's name (``GetModel``)."""
    http_method: str
    """``GET``, ``POST``, ``PUT``, ``PATCH`` or ``DELETE``."""
    path: PathTemplate
    body: str
    """``""`` (no body), ``*`` (the whole request message) or the request field the body fills."""
    response_body: str
    """``""`` for the whole response message, or the response field returned."""
    input_type: Descriptor
    output_type: Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def grpc_path(self) -> str:
        """``/package.Service/Method``, as gRPC names the call."""
        return f"/{self.service}/{self.method}"


def _binding(method: MethodDescriptor, rule: http_pb2.HttpRule) -> HttpBinding:
    pattern = rule.WhichOneof("pattern")
    if pattern in _VERBS:
        http_method, path = pattern.upper(), getattr(rule, pattern)
    elif pattern == "custom":
        http_method, path = rule.custom.kind.upper(), rule.custom.path
    else:
        raise ValueError(f"{method.full_name}: google.api.http names no path")
    return HttpBinding(
        service=method.containing_service.full_name,
        method=method.name,
        http_method=http_method,
        path=PathTemplate.parse(path),
        body=rule.body,
        response_body=rule.response_body,
        input_type=method.input_type,
        output_type=method.output_type,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )


def bindings_of(services: Iterable[ServiceDescriptor]) -> list[HttpBinding]:
    """Every ``google.api.http`` binding (additional bindings included) of every method of
    ``services``; methods without the annotation are not reachable over REST."""
    bindings: list[HttpBinding] = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            rules: Sequence[http_pb2.HttpRule] = [rule, *rule.additional_bindings]
            bindings.extend(_binding(method, r) for r in rules)
    return bindings
