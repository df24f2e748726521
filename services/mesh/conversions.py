"""Conversions between protobuf's well-known types and Python values, for every service's
converters."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from services.mesh.errors import InvalidArgument


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp of ``value``; None (the field stays unset) for None."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def datetime_of(message: object, field: str) -> datetime | None:
    """The aware UTC time in ``message.<field>`` (a Timestamp), or None when it is unset."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as error:
        raise InvalidArgument.for_field(field, "is not a time from year 1 to 9999") from error
