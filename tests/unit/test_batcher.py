"""The batcher: coalescing, exact splitting, deadlines, isolation of bad requests, cancellation.

The execute function is a real one over numpy (``Doubler``); executions are held open with
events where a test needs requests to queue behind them.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.mesh.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from services.scoring import batcher as batcher_module
from services.scoring.backend import Array
from services.scoring.batcher import Batcher, BatchShapeError, Outputs, is_request_fault
from tests.fakes import FakeClock

pytestmark = pytest.mark.timeout(10)

KEY = ("model", 1)


class Doubler:
    """Executes ``y = 2·x`` and ``s`` = the sum of each row. Bad input: any negative value
    (``InvalidArgument``, as a backend reports it). ``gate``, when given, holds each
    execution until set; ``started`` is set once an execution has begun."""

    def __init__(self, *, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.started = asyncio.Event()
        self.shapes: list[tuple[int, ...]] = []
        self.timeouts: list[float] = []
        self.running = 0
        self.peak = 0

    @property
    def rows(self) -> list[int]:
        return [shape[0] for shape in self.shapes]

    async def __call__(self, inputs: dict[str, Array], timeout_s: float) -> Outputs:
        x = inputs["x"]
        self.shapes.append(x.shape)
        self.timeouts.append(timeout_s)
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.running -= 1
        if (x < 0).any():
            raise InvalidArgument.for_field("inputs.x", "must not be negative")
        return {"y": x * 2, "s": x.sum(axis=-1)}


def request(i: int, rows: int = 1) -> dict[str, Array]:
    """Rows unique to request ``i``, so that a mixed-up split shows."""
    return {"x": (np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + 1000 * i)}


def assert_answers(inputs: dict[str, Array], outputs: Outputs) -> None:
    np.testing.assert_array_equal(outputs["y"], inputs["x"] * 2)
    np.testing.assert_array_equal(outputs["s"], inputs["x"].sum(axis=-1))


async def started(fake: Doubler) -> None:
    await fake.started.wait()
    fake.started.clear()


# coalescing and splitting


async def test_concurrent_requests_share_one_execution_and_get_their_own_rows() -> None:
    fake = Doubler()
    batcher = Batcher(fake, max_batch_rows=64)
    inputs = [request(i, rows=1 + i % 3) for i in range(32)]

    results = await asyncio.gather(*(batcher.submit(KEY, x) for x in inputs))

    assert fake.rows == [sum(1 + i % 3 for i in range(32))]
    for x, outputs in zip(inputs, results, strict=True):
        assert_answers(x, outputs)
    assert batcher.stats.batches == 1
    assert batcher.stats.requests == 32
    assert batcher.stats.mean_batch_rows == fake.rows[0]


async def test_arrivals_during_an_execution_form_the_next_batch() -> None:
    gate = asyncio.Event()
    fake = Doubler(gate=gate)
    batcher = Batcher(fake, max_batch_rows=64)
    first = asyncio.create_task(batcher.submit(KEY, request(0)))
    await started(fake)
    inputs = [request(i) for i in range(1, 11)]
    rest = [asyncio.create_task(batcher.submit(KEY, x)) for x in inputs]
    await asyncio.sleep(0)
    assert fake.rows == [1]  # the others wait for the running batch

    gate.set()
    assert_answers(request(0), await first)
    for x, task in zip(inputs, rest, strict=True):
        assert_answers(x, await task)
    assert fake.rows == [1, 10]


async def test_requests_with_different_keys_never_share_a_batch() -> None:
    fake = Doubler()
    batcher = Batcher(fake, max_batch_rows=64)
    await asyncio.gather(*(batcher.submit(("model", i % 2), request(i)) for i in range(8)))
    assert sorted(fake.rows) == [4, 4]


async def test_batches_respect_max_rows_and_a_bigger_request_runs_alone() -> None:
    fake = Doubler()
    batcher = Batcher(fake, max_batch_rows=8)
    inputs = [request(i, rows=3) for i in range(10)] + [request(10, rows=11)]

    results = await asyncio.gather(*(batcher.submit(KEY, x) for x in inputs))

    for x, outputs in zip(inputs, results, strict=True):
        assert_answers(x, outputs)
    assert fake.rows == [6, 6, 6, 6, 6, 11]


async def test_a_lone_request_runs_at_once_despite_a_queue_delay() -> None:
    fake = Doubler()
    batcher = Batcher(fake, max_batch_rows=64, max_queue_delay_s=3600)
    async with asyncio.timeout(5):
        assert_answers(request(1), await batcher.submit(KEY, request(1)))
    assert batcher.stats.flush_idle == 1


async def test_a_queue_delay_keeps_the_batch_open_while_requests_keep_coming() -> None:
    clock = FakeClock()
    fake = Doubler()
    batcher = Batcher(fake, max_batch_rows=64, max_queue_delay_s=1.0, clock=clock)

    async def later(i: int) -> Outputs:
        # an arrival one turn after the previous one: the batch stays open for it
        for _ in range(i):
            await asyncio.sleep(0)
        return await batcher.submit(KEY, request(i))

    await asyncio.gather(*(later(i) for i in range(4)))
    assert fake.rows == [4]
    assert batcher.stats.flush_idle == 1

    async def arrive_after_the_delay() -> Outputs:
        clock.now += 2.0
        return await batcher.submit(KEY, request(1))

    await asyncio.gather(batcher.submit(KEY, request(0)), arrive_after_the_delay())
    assert fake.rows == [4, 2]
    assert batcher.stats.flush_delay == 1


async def test_the_execution_gets_the_latest_members_remaining_time_capped() -> None:
    clock = FakeClock()
    fake = Doubler()
    batcher = Batcher(fake, timeout_cap_s=30.0, clock=clock)

    await asyncio.gather(
        batcher.submit(KEY, request(0), clock.now + 5),
        batcher.submit(KEY, request(1), clock.now + 10),
    )
    await batcher.submit(KEY, request(2), clock.now + 100)
    await asyncio.gather(batcher.submit(KEY, request(3), clock.now + 5), batcher.submit(KEY, request(4)))

    assert fake.timeouts == [10.0, 30.0, 30.0]


# deadlines


async def test_a_request_past_its_deadline_is_refused_before_queueing() -> None:
    fake = Doubler()
    batcher = Batcher(fake)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(KEY, request(0), loop.time() - 1)
    assert fake.shapes == []
    assert batcher.stats.expired == 1


async def test_a_request_expiring_while_queued_fails_without_reaching_execute() -> None:
    gate = asyncio.Event()
    fake = Doubler(gate=gate)
    batcher = Batcher(fake)
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(batcher.submit(KEY, request(0)))
    await started(fake)

    with pytest.raises(DeadlineExceeded):
        await batcher.submit(KEY, request(1), loop.time() + 0.05)

    gate.set()
    await first
    assert fake.rows == [1]
    assert batcher.stats.expired == 1


async def test_expired_members_are_dropped_right_before_execution() -> None:
    # the fake clock moves past the deadline without the loop's timer firing: the check
    # before execution is what catches it
    clock = FakeClock()
    gate = asyncio.Event()
    fake = Doubler(gate=gate)
    batcher = Batcher(fake, clock=clock)
    first = asyncio.create_task(batcher.submit(KEY, request(0)))
    await started(fake)
    expiring = asyncio.create_task(batcher.submit(KEY, request(1), clock.now + 60))
    lasting = asyncio.create_task(batcher.submit(KEY, request(2), clock.now + 600))
    await asyncio.sleep(0)

    clock.now += 120
    gate.set()
    await first
    with pytest.raises(DeadlineExceeded):
        await expiring
    assert_answers(request(2), await lasting)
    assert fake.rows == [1, 1]


# failures


async def test_one_bad_request_fails_alone_and_its_neighbours_succeed() -> None:
    fake = Doubler()
    batcher = Batcher(fake, max_batch_rows=64)
    inputs = [request(i) for i in range(32)]
    inputs[17] = {"x": -request(17)["x"]}

    results = await asyncio.gather(
        *(batcher.submit(KEY, x) for x in inputs),
        return_exceptions=True,
    )

    assert isinstance(results[17], InvalidArgument)
    for i, (x, outputs) in enumerate(zip(inputs, results, strict=True)):
        if i != 17:
            assert isinstance(outputs, dict), (i, outputs)
            assert_answers(x, outputs)
    # bisection: 32 → 16+16 → 8+8 → 4+4 → 2+2 → 1+1
    assert sorted(fake.rows, reverse=True) == [32, 16, 16, 8, 8, 4, 4, 2, 2, 1, 1]
    assert batcher.stats.isolations == 5


async def test_a_backend_failure_fails_every_member_without_re_running() -> None:
    calls: list[int] = []

    async def down(inputs: dict[str, Array], timeout_s: float) -> Outputs:
        calls.append(len(inputs["x"]))
        raise Unavailable("backend down")

    batcher = Batcher(down, max_batch_rows=64)
    results = await asyncio.gather(
        *(batcher.submit(KEY, request(i)) for i in range(32)), return_exceptions=True
    )

    assert all(isinstance(r, Unavailable) for r in results)
    assert calls == [32]
    assert batcher.stats.isolations == 0


async def test_outputs_with_the_wrong_row_count_fail_the_batch() -> None:
    calls: list[int] = []

    async def short(inputs: dict[str, Array], timeout_s: float) -> Outputs:
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"][:-1]}

    batcher = Batcher(short, max_batch_rows=64)
    results = await asyncio.gather(
        *(batcher.submit(KEY, request(i)) for i in range(4)), return_exceptions=True
    )

    assert all(isinstance(r, BatchShapeError) for r in results)
    assert calls == [4]


async def test_inputs_that_disagree_on_rows_are_refused() -> None:
    batcher = Batcher(Doubler())
    with pytest.raises(InvalidArgument):
        await batcher.submit(KEY, {"x": np.zeros((2, 2)), "z": np.zeros((3, 2))})


async def test_a_full_queue_refuses_with_resource_exhausted() -> None:
    gate = asyncio.Event()
    fake = Doubler(gate=gate)
    batcher = Batcher(fake, max_queued_rows=4)
    first = asyncio.create_task(batcher.submit(KEY, request(0)))
    await started(fake)
    queued = asyncio.create_task(batcher.submit(KEY, request(1, rows=4)))
    await asyncio.sleep(0)

    with pytest.raises(ResourceExhausted):
        await batcher.submit(KEY, request(2))

    gate.set()
    await asyncio.gather(first, queued)


# cancellation and shutdown


async def test_a_cancelled_waiting_request_leaves_the_queue() -> None:
    gate = asyncio.Event()
    fake = Doubler(gate=gate)
    batcher = Batcher(fake, max_batch_rows=64)
    first = asyncio.create_task(batcher.submit(KEY, request(0)))
    await started(fake)
    gone = asyncio.create_task(batcher.submit(KEY, request(1, rows=5)))
    staying = asyncio.create_task(batcher.submit(KEY, request(2)))
    await asyncio.sleep(0)

    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    gate.set()

    await first
    assert_answers(request(2), await staying)
    assert fake.rows == [1, 1]
    assert batcher.stats.cancelled == 1


async def test_a_request_cancelled_while_its_batch_runs_does_not_disturb_the_others() -> None:
    gate = asyncio.Event()
    fake = Doubler(gate=gate)
    batcher = Batcher(fake, max_batch_rows=64)
    tasks = [asyncio.create_task(batcher.submit(KEY, request(i))) for i in range(3)]
    await started(fake)

    tasks[1].cancel()
    gate.set()

    assert_answers(request(0), await tasks[0])
    assert_answers(request(2), await tasks[2])
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]


async def test_close_fails_queued_requests_and_lets_running_ones_finish() -> None:
    gate = asyncio.Event()
    fake = Doubler(gate=gate)
    batcher = Batcher(fake)
    running = asyncio.create_task(batcher.submit(KEY, request(0)))
    await started(fake)
    queued = asyncio.create_task(batcher.submit(KEY, request(1)))
    await asyncio.sleep(0)

    closing = asyncio.create_task(batcher.close())
    with pytest.raises(Unavailable):
        await queued
    gate.set()
    await closing

    assert_answers(request(0), await running)
    with pytest.raises(Unavailable):
        await batcher.submit(KEY, request(2))
    assert fake.rows == [1]


# a model that does not batch


async def test_without_batching_each_request_runs_alone_within_the_concurrency_limit() -> None:
    gate = asyncio.Event()
    fake = Doubler(gate=gate)
    batcher = Batcher(fake, max_batch_rows=0, max_concurrent_batches=2)
    inputs = [{"x": np.array([i, i + 0.5], dtype=np.float32)} for i in range(5)]
    tasks = [asyncio.create_task(batcher.submit(KEY, x)) for x in inputs]
    await started(fake)
    await asyncio.sleep(0)
    assert fake.running == 2

    gate.set()
    for x, task in zip(inputs, tasks, strict=True):
        assert_answers(x, await task)
    assert fake.shapes == [(2,)] * 5
    assert fake.peak == 2
    assert batcher.stats.flush_full == 5


async def test_a_key_can_set_its_own_row_limit() -> None:
    fake = Doubler()
    batcher = Batcher(fake, max_batch_rows=64)
    unbatched = [{"x": np.array([i, i + 0.5], dtype=np.float32)} for i in range(3)]

    results = await asyncio.gather(
        *(batcher.submit(("flat", 1), x, max_rows=0) for x in unbatched),
        *(batcher.submit(("small", 1), request(i), max_rows=2) for i in range(4)),
    )

    for x, outputs in zip(unbatched + [request(i) for i in range(4)], results, strict=True):
        assert_answers(x, outputs)
    assert sorted(fake.shapes) == [(2,), (2,), (2,), (2, 2), (2, 2)]


async def test_execute_can_be_given_per_submit() -> None:
    fake = Doubler()
    batcher = Batcher()
    assert_answers(request(3), await batcher.submit(KEY, request(3), execute=fake))
    with pytest.raises(TypeError):
        await batcher.submit(KEY, request(3))


@pytest.mark.parametrize(
    ("error", "isolated"),
    [
        (InvalidArgument("bad row"), True),
        (ResourceExhausted("batch too big for memory"), True),
        (ValueError("unclassified"), True),
        (Unavailable("down"), False),
        (DeadlineExceeded("slow"), False),
        (TimeoutError(), False),
        (ConnectionResetError(), False),
    ],
)
def test_which_failures_are_isolated(error: Exception, isolated: bool) -> None:
    assert is_request_fault(error) is isolated


# tracing


async def test_a_batch_span_is_a_child_of_its_first_member_and_links_to_every_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    monkeypatch.setattr(batcher_module, "_tracer", tracer)
    fake = Doubler()
    batcher = Batcher(fake, max_batch_rows=64)

    async def traced(i: int) -> trace.SpanContext:
        with tracer.start_as_current_span(f"request {i}") as span:
            await batcher.submit(KEY, request(i), attributes={"scoremesh.model": "m"})
            return span.get_span_context()

    contexts = await asyncio.gather(*(traced(i) for i in range(3)))
    spans = exporter.get_finished_spans()
    (batch,) = [s for s in spans if s.name == "batch"]
    assert batch.parent is not None
    assert batch.parent.span_id == contexts[0].span_id
    assert batch.context.trace_id == contexts[0].trace_id
    assert {link.context.span_id for link in batch.links} == {c.span_id for c in contexts}
    assert batch.attributes is not None
    assert (batch.attributes["scoremesh.batch_size"], batch.attributes["scoremesh.model"]) == (3, "m")
    waits = [s for s in spans if s.name == "queue wait"]
    assert sorted(w.parent.span_id for w in waits if w.parent) == sorted(c.span_id for c in contexts)
    assert all(w.end_time is not None and w.start_time is not None for w in waits)
    assert all(w.end_time >= w.start_time for w in waits)  # type: ignore[operator]


async def test_untraced_requests_make_no_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(batcher_module, "_tracer", provider.get_tracer("test"))
    batcher = Batcher(Doubler(), max_batch_rows=64)
    await asyncio.gather(*(batcher.submit(KEY, request(i)) for i in range(3)))
    # outside any trace a batch starts none of its own
    assert exporter.get_finished_spans() == ()


async def test_a_batch_joins_a_sampled_members_trace_when_the_first_is_not_sampled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    monkeypatch.setattr(batcher_module, "_tracer", tracer)
    seen: list[trace.SpanContext] = []

    async def execute(inputs: dict[str, Array], timeout_s: float) -> Outputs:
        seen.append(trace.get_current_span().get_span_context())
        return {"y": inputs["x"] * 2}

    batcher = Batcher(execute, max_batch_rows=64)
    unsampled = trace.SpanContext(0x1, 0x2, is_remote=True, trace_flags=trace.TraceFlags(0))

    async def untraced_member() -> None:
        with trace.use_span(trace.NonRecordingSpan(unsampled)):
            await batcher.submit(KEY, request(0))

    async def traced_member() -> trace.SpanContext:
        with tracer.start_as_current_span("sampled request") as span:
            await batcher.submit(KEY, request(1))
            return span.get_span_context()

    _, sampled = await asyncio.gather(untraced_member(), traced_member())
    (batch,) = [s for s in exporter.get_finished_spans() if s.name == "batch"]
    assert batch.parent is not None
    assert (batch.parent.span_id, batch.context.trace_id) == (sampled.span_id, sampled.trace_id)
    assert {link.context.span_id for link in batch.links} == {unsampled.span_id, sampled.span_id}
    # the backend ran in the batch's context, not in the one of the request that started the task
    assert [c.span_id for c in seen] == [batch.context.span_id]
