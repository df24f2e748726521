"""The registry's domain objects: plain, immutable, free of protobuf and asyncpg."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from services.mesh.errors import FieldViolation, InvalidArgument
from services.mesh.identity import Caller

MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_ALIAS = "production"


class Visibility(enum.Enum):
    PRIVATE = "private"
    PUBLIC = "public"


class VersionStatus(enum.Enum):
    READY = "ready"
    FAILED = "failed"


class EventType(enum.Enum):
    VERSION_CREATED = "version_created"
    ALIAS_SET = "alias_set"
    ALIAS_DELETED = "alias_deleted"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a graph. ``datatype`` uses the Open Inference Protocol's
    names (FP32, INT64, BYTES…); ``shape`` has -1 for every variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True, slots=True)
class VerificationCheck:
    """The outcome of one verification step (``checker``, ``opset``, ``trial_inference``…)."""

    name: str
    passed: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class VerificationReport:
    checks: tuple[VerificationCheck, ...]
    opset: int = 0

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> tuple[VerificationCheck, ...]:
        return tuple(check for check in self.checks if not check.passed)


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    tenant: str
    description: str
    visibility: Visibility
    create_time: datetime
    created_by: str
    latest_version: int = 0

    def visible_to(self, caller: Caller) -> bool:
        return self.visibility is Visibility.PUBLIC or self.tenant == caller.tenant


@dataclass(frozen=True, slots=True)
class ModelVersion:
    model: str
    version: int
    sha256: str
    size_bytes: int
    signature: Signature
    status: VersionStatus
    report: VerificationReport
    create_time: datetime
    created_by: str


@dataclass(frozen=True, slots=True)
class Alias:
    model: str
    alias: str
    version: int
    update_time: datetime
    updated_by: str


@dataclass(frozen=True, slots=True)
class AliasChange:
    """One audited move of an alias; ``from_version`` 0 means it did not exist before,
    ``to_version`` 0 means it was deleted."""

    model: str
    alias: str
    from_version: int
    to_version: int
    actor: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class Threshold:
    """One row of a model card's decision table: at ``value`` on ``output``, these metrics hold."""

    output: str
    value: float
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelCard:
    model: str
    version: int
    metrics: Mapping[str, Any]
    thresholds: tuple[Threshold, ...]
    description: str
    update_time: datetime | None


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """A change the registry announces through WatchModels; ``cursor`` orders them."""

    cursor: int
    type: EventType
    model: str
    version: int
    alias: str
    previous_version: int
    actor: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class Resolved:
    version: ModelVersion
    alias: str
    artifact_uri: str


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_page_token: str


def check_model_name(name: str, field_name: str = "model") -> str:
    if not MODEL_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"{field_name}: invalid model name {name!r}",
            violations=[
                FieldViolation(
                    field_name,
                    "must be 1-128 characters of letters, digits, '_', '.', '-', start with a "
                    "letter or digit and not contain '..'",
                )
            ],
            reason="INVALID_MODEL_NAME",
        )
    return name


def check_alias_name(alias: str, field_name: str = "alias") -> str:
    if not ALIAS_PATTERN.fullmatch(alias):
        raise InvalidArgument(
            f"{field_name}: invalid alias {alias!r}",
            violations=[
                FieldViolation(
                    field_name,
                    "must be 1-63 characters of lowercase letters, digits, '_' and '-', "
                    "starting with a letter",
                )
            ],
            reason="INVALID_ALIAS",
        )
    return alias
