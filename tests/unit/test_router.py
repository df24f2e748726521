"""How an inference request's ``model_version`` is read, and which graphs batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from scoremesh.registry.v1 import registry_pb2 as reg

from services.mesh.errors import InvalidArgument
from services.mesh.identity import Caller
from services.registry.client import RegistryClient
from services.registry.domain import Signature, TensorSpec
from services.scoring.router import ModelRouter, VersionLoader, batch_size_for, parse_reference


@pytest.mark.parametrize(
    ("text", "version", "alias"),
    [("", None, "production"), ("  ", None, "production"), ("3", 3, None), ("staging", None, "staging")],
)
def test_model_version_is_a_number_an_alias_or_nothing(
    text: str, version: int | None, alias: str | None
) -> None:
    reference = parse_reference(text)
    assert (reference.version, reference.alias) == (version, alias)


@pytest.mark.parametrize(
    "text", ["0", "-1", "v 1", "Prod", "a/b", "x" * 64, "9" * 20, "\u00b2", "\u0661", str(2**63)]
)
def test_other_model_versions_are_invalid_arguments(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_reference(text)
    assert [v.field for v in caught.value.violations] == ["model_version"]


def _signature(*shapes: tuple[int, ...]) -> Signature:
    inputs = tuple(TensorSpec(f"in{i}", "FP32", shape) for i, shape in enumerate(shapes))
    return Signature(inputs, (TensorSpec("out", "FP32", (-1, 1)),))


def test_graphs_batch_only_when_every_first_dimension_is_variable() -> None:
    assert batch_size_for(_signature((-1, 4), (-1,)), 64) == 64
    assert batch_size_for(_signature((-1, 4), (2, 4)), 64) == 0
    assert batch_size_for(_signature((4,)), 64) == 0
    assert batch_size_for(_signature((-1, 4)), 0) == 0
    assert batch_size_for(_signature(()), 64) == 0


class _WatchRecorder:
    """A registry client whose watch notes the trace context it was opened in, then waits."""

    def __init__(self) -> None:
        self.opened_in: asyncio.Future[trace.SpanContext] = asyncio.get_running_loop().create_future()

    def watch(self, cursor: str = "") -> AsyncIterator[reg.WatchModelsResponse]:
        return self._watch()

    async def _watch(self) -> AsyncIterator[reg.WatchModelsResponse]:
        if not self.opened_in.done():
            self.opened_in.set_result(trace.get_current_span().get_span_context())
        await asyncio.Event().wait()
        yield reg.WatchModelsResponse()  # never reached


async def test_the_registry_watch_stays_out_of_the_trace_of_the_request_that_opened_it() -> None:
    recorder = _WatchRecorder()
    router = ModelRouter(lambda caller: cast(RegistryClient, recorder), cast(VersionLoader, None), 64)
    request = SpanContext(0xABC, 0xDEF, True, TraceFlags(TraceFlags.SAMPLED))
    try:
        with trace.use_span(NonRecordingSpan(request)):
            router._ensure_watch(Caller(tenant="acme", principal="alice"))
        opened_in = await asyncio.wait_for(recorder.opened_in, 10)
    finally:
        await router.close()
    assert not opened_in.is_valid
