"""Our ``protos/inference/grpc_service.proto`` is wire-compatible with Triton's, as tritonclient
ships it: every message, field, number and type we declare is Triton's, and every RPC we
declare has Triton's request and response types.

The two sets of generated messages cannot be imported into one process (they define the same
protobuf symbols), so ours are described by a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from google.protobuf.descriptor import Descriptor, FileDescriptor

_DESCRIBE = """
import json
from inference import grpc_service_pb2 as ours
from tests.unit.test_oip_wire import describe
print(json.dumps(describe(ours.DESCRIPTOR)))
"""


def _fields(message: Descriptor, prefix: str, out: dict[str, Any]) -> None:
    name = f"{prefix}{message.name}"
    out[name] = {
        field.name: [field.number, field.type, field.message_type.full_name if field.message_type else ""]
        for field in message.fields
    }
    for nested in message.nested_types:
        _fields(nested, f"{name}.", out)


def describe(file: FileDescriptor) -> dict[str, Any]:
    """Messages (with nested ones) → field → [number, type, message type]; and RPCs →
    [request, response]."""
    messages: dict[str, Any] = {}
    for message in file.message_types_by_name.values():
        _fields(message, "", messages)
    service = file.services_by_name["GRPCInferenceService"]
    methods = {m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods}
    return {"messages": messages, "methods": methods}


def test_our_protocol_is_a_subset_of_tritons_on_the_wire() -> None:
    # imported here: the child imports this module, and must not load tritonclient's messages
    from tritonclient.grpc import service_pb2 as triton

    result = subprocess.run(
        [sys.executable, "-c", _DESCRIBE], capture_output=True, text=True, timeout=60, check=True
    )
    ours = json.loads(result.stdout)
    theirs = describe(triton.DESCRIPTOR)

    assert ours["methods"], "our proto declares no RPC"
    assert "ModelInferRequest.InferInputTensor" in ours["messages"]
    for method, types in ours["methods"].items():
        assert theirs["methods"].get(method) == types, method
    for message, fields in ours["messages"].items():
        assert message in theirs["messages"], message
        for field, spec in fields.items():
            assert theirs["messages"][message].get(field) == spec, f"{message}.{field}"
