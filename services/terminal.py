"""What the ``scoremesh`` commands print: protobuf messages as JSON, and JSON itself."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message


def as_json(message: Message) -> dict[str, Any]:
    """A message as proto3 JSON with the proto's own field names (what ``--json`` prints)."""
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return data


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))
