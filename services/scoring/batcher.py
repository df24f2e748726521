"""Dynamic batching: concurrent requests for one batch key share one backend call.

A request arriving while its key has a free execution slot runs at the next loop turn with
whatever is queued by then (flushed early because the backend is idle), so a lone request
pays no batching latency. While batches execute, arrivals queue; when an execution finishes,
the queue is flushed as the next batch, up to ``max_batch_rows``. Under load batches
therefore grow by themselves, without a fixed wait.

Deadlines are absolute times on the batcher's clock (the event loop's by default). A request
whose deadline passes while it waits fails with ``DeadlineExceeded`` and never reaches the
backend; members are checked once more right before each execution.

A failing batch of several requests is bisected and re-run so that only the request(s) whose
input makes the backend fail get the error (:func:`is_request_fault`); errors that say the
backend itself cannot serve (``Unavailable``, ``NotFound``…) fail every member at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext
from opentelemetry.util.types import AttributeValue

from services.mesh import metrics
from services.mesh.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MeshError,
    ResourceExhausted,
    Unavailable,
)
from services.scoring.backend import Array

__all__ = [
    "BatchShapeError",
    "Batcher",
    "BatcherStats",
    "Execute",
    "Outputs",
    "is_request_fault",
]

log = logging.getLogger(__name__)
# a proxy: it follows the SDK a service's main installs later (or stays a no-op)
_tracer = trace.get_tracer(__name__)

Outputs = dict[str, Array]
Execute = Callable[[dict[str, Array], float], Awaitable[Outputs]]
"""``async execute(inputs, timeout_s) -> outputs``: runs one batch (the batch on axis 0 of
every array, or no batch axis when batching is off) within ``timeout_s`` seconds."""


class BatchShapeError(RuntimeError):
    """The backend broke its contract: an output's axis 0 is not the batch's row count.

    Not a :class:`MeshError` on purpose: it is a bug, reported as INTERNAL and logged."""


def is_request_fault(exc: BaseException) -> bool:
    """Whether a batch failure may be caused by one member's input, so that re-running the
    members apart can spare the others: bad input (``InvalidArgument``), a batch too big for
    memory (``ResourceExhausted``) and errors the backend did not classify. Any other domain
    error (``Unavailable``, ``DeadlineExceeded``, ``NotFound``…) and I/O errors (timeouts and
    lost connections are ``OSError``) are about the backend and would fail the re-runs too."""
    if isinstance(exc, MeshError):
        return isinstance(exc, InvalidArgument | ResourceExhausted)
    return isinstance(exc, Exception) and not isinstance(exc, OSError)


@dataclass(slots=True)
class BatcherStats:
    """Counters since start; ``rows / batches`` is the achieved batch size."""

    batches: int = 0
    """Batches sent to the backend (isolation re-runs not included)."""
    executions: int = 0
    """Backend calls, isolation re-runs included."""
    requests: int = 0
    """Requests in those batches."""
    rows: int = 0
    """Rows in those batches."""
    flush_idle: int = 0
    """Flushes decided because a slot was free and no more company was coming."""
    flush_full: int = 0
    """Flushes decided because the queue held ``max_batch_rows`` (every one when off)."""
    flush_delay: int = 0
    """Flushes decided because the oldest request had waited ``max_queue_delay_s``."""
    expired: int = 0
    """Requests that failed with ``DeadlineExceeded`` here (waiting, or before a call)."""
    cancelled: int = 0
    """Requests whose caller went away before their result."""
    isolations: int = 0
    """Failed multi-request executions that were split and re-run."""

    @property
    def mean_batch_rows(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class _Pending:
    """One submitted request. ``queued`` is cleared when it leaves the queue, either into a
    batch or because its caller went away (the deque entry is then skipped lazily, so that a
    cancellation costs O(1))."""

    __slots__ = (
        "deadline",
        "enqueued_at",
        "enqueued_ns",
        "execute",
        "future",
        "inputs",
        "queued",
        "rows",
        "span_context",
    )

    def __init__(
        self,
        inputs: dict[str, Array],
        rows: int,
        deadline: float | None,
        enqueued_at: float,
        future: asyncio.Future[Outputs],
        execute: Execute,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.deadline = deadline
        self.enqueued_at = enqueued_at
        self.future = future
        self.execute = execute
        self.queued = True
        # the submitting request's span: the batch links to it, its queue wait is its child
        self.span_context: SpanContext = trace.get_current_span().get_span_context()
        self.enqueued_ns = time.time_ns() if self.span_context.trace_flags.sampled else 0


class _Queue:
    """The state of one batch key."""

    __slots__ = (
        "arrivals",
        "attributes",
        "items",
        "key",
        "max_rows",
        "queued",
        "queued_rows",
        "quiet",
        "running",
        "seen",
        "starting",
        "turn",
    )

    def __init__(self, key: Hashable, max_rows: int, attributes: Mapping[str, AttributeValue]) -> None:
        self.key = key
        self.max_rows = max_rows  # 0: the key does not batch
        self.attributes = dict(attributes)  # on every batch span of the key
        self.items: deque[_Pending] = deque()
        self.queued = 0
        self.queued_rows = 0
        self.running = 0  # execution slots taken, a starting batch's included
        self.starting = False  # a batch task is started and has not yet taken its members
        # waiting for company (max_queue_delay_s > 0): arrivals counted, their count at the
        # last look, the next look, and whether this look found no new arrival
        self.arrivals = 0
        self.seen = 0
        self.turn: asyncio.Handle | None = None
        self.quiet = False


class Batcher:
    """Coalesces concurrent :meth:`submit` calls with the same key into backend calls.

    ``max_batch_rows``: the most rows in one call, for keys whose :meth:`submit` gives no
    ``max_rows``; 0 means the model does not batch, so each request runs alone (its arrays
    have no batch axis) but still under the concurrency limit. A request with more rows than
    this runs alone.

    ``max_queue_delay_s``: how long a request may wait for company while an execution slot is
    free. 0 (the default) never waits: an idle backend runs what arrived in the same loop
    turn, and bigger batches form from requests that arrive while earlier batches execute.
    A positive value holds a small batch open while requests keep arriving (one loop turn
    after another) for at most this long; the first whole turn without an arrival flushes
    it, so a lone request still runs at once (two loop turns later).

    ``max_concurrent_batches``: executions in flight per key; more arrivals queue.

    ``max_queued_rows``: rows that may wait per key before :meth:`submit` answers
    ``ResourceExhausted`` (None: unbounded; requests count as one row when batching is off).

    ``timeout_cap_s``: the most time one execution is given; an execution gets its latest
    member's remaining time, capped by this (a request without deadline counts as the cap).

    ``clock``: what deadlines are measured on; the event loop's ``time()`` by default.
    """

    def __init__(
        self,
        execute: Execute | None = None,
        *,
        max_batch_rows: int = 64,
        max_queue_delay_s: float = 0.0,
        max_concurrent_batches: int = 1,
        max_queued_rows: int | None = None,
        timeout_cap_s: float = 60.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if max_batch_rows < 0:
            raise ValueError(f"max_batch_rows must be >= 0, not {max_batch_rows}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, not {max_queue_delay_s}")
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, not {max_concurrent_batches}")
        if timeout_cap_s <= 0:
            raise ValueError(f"timeout_cap_s must be > 0, not {timeout_cap_s}")
        self._execute = execute
        self._max_rows = max_batch_rows
        self._delay = max_queue_delay_s
        self._max_running = max_concurrent_batches
        self._max_queued_rows = max_queued_rows
        self._timeout_cap = timeout_cap_s
        self._clock = clock
        self._queues: dict[Hashable, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.stats = BatcherStats()

    async def submit(
        self,
        key: Hashable,
        inputs: Mapping[str, Array],
        deadline: float | None = None,
        *,
        execute: Execute | None = None,
        max_rows: int | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Outputs:
        """Runs ``inputs`` in a batch with other requests of ``key`` and returns its own rows
        of each output.

        ``key`` must capture everything that makes two requests unable to share a call: the
        model version, the non-batch dimensions and dtypes of every input, the outputs
        requested. ``execute`` overrides the one given at construction, ``max_rows`` the
        ``max_batch_rows`` (0: this key does not batch, e.g. a graph without a batch axis);
        requests with one key must pass the same ones (a batch runs its first member's
        ``execute``; the queue keeps the ``max_rows`` it was created with). ``attributes``
        go on the key's batch spans (the model, version and backend).

        Raises ``DeadlineExceeded`` when ``deadline`` passes first, ``ResourceExhausted``
        when the key's queue is full, ``Unavailable`` once closed, ``InvalidArgument`` when
        the inputs disagree on their row count, and otherwise what ``execute`` raised for
        this request.
        """
        if self._closed:
            raise Unavailable("the scoring service is shutting down", reason="SHUTTING_DOWN")
        run = execute or self._execute
        if run is None:
            raise TypeError("Batcher.submit needs an execute function (none given at construction)")
        loop = asyncio.get_running_loop()
        now = self._now(loop)
        if deadline is not None and deadline <= now:
            self.stats.expired += 1
            raise DeadlineExceeded("the deadline passed before the request was queued")
        queue = self._queues.get(key)
        if queue is None:
            limit = self._max_rows if max_rows is None else max_rows
            if limit < 0:
                raise ValueError(f"max_rows must be >= 0, not {limit}")
            queue = _Queue(key, limit, attributes or {})
        rows = _rows_of(inputs, batching=queue.max_rows > 0)
        if (
            self._max_queued_rows is not None
            and queue.queued
            and queue.queued_rows + rows > self._max_queued_rows
        ):
            raise ResourceExhausted(
                f"{queue.queued_rows} rows are already waiting for this model",
                reason="QUEUE_FULL",
            )
        self._queues[key] = queue  # only now: a refused request leaves no queue behind
        pending = _Pending(dict(inputs), rows, deadline, now, loop.create_future(), run)
        queue.items.append(pending)
        queue.queued += 1
        queue.queued_rows += rows
        queue.arrivals += 1
        self._dispatch(queue)
        try:
            if deadline is None:
                return await pending.future
            # a timer at the same distance on the loop's clock: a waiting request leaves at
            # its deadline, not when the batch ahead of it finishes
            async with asyncio.timeout(deadline - now):
                return await pending.future
        except TimeoutError:
            if not pending.future.cancelled():
                raise  # execute's own TimeoutError, not our deadline
            self.stats.expired += 1
            raise DeadlineExceeded("the deadline passed while the request waited") from None
        except asyncio.CancelledError:
            self.stats.cancelled += 1
            raise
        finally:
            # being cancelled while awaiting a future cancels the future too: a request still
            # queued leaves the queue; one in a running batch is skipped when results arrive
            if pending.queued:
                self._unqueue(queue, pending)
                self._forget_if_idle(queue)

    async def close(self) -> None:
        """Fails every queued request with ``Unavailable``, refuses new ones and waits for the
        executions in flight (their members still get their results)."""
        self._closed = True
        error = Unavailable("the scoring service is shutting down", reason="SHUTTING_DOWN")
        for queue in list(self._queues.values()):
            while queue.items:
                pending = queue.items.popleft()
                if pending.queued:
                    self._unqueue(queue, pending)
                    _fail(pending, error)
            self._forget_if_idle(queue)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # queueing

    def _dispatch(self, queue: _Queue) -> None:
        """Starts the next batch of ``queue`` if a slot is free and a flush is due.

        At most one started batch has not yet taken its members: it takes them when it runs,
        a loop turn later, so that requests arriving in the same turn join it; once it has
        taken them it calls this again for what is left."""
        if queue.starting or not queue.queued or queue.running >= self._max_running or self._closed:
            return
        if not queue.max_rows or queue.queued_rows >= queue.max_rows:
            self.stats.flush_full += 1
        elif self._delay <= 0 or queue.quiet:
            self.stats.flush_idle += 1
        elif self._now(asyncio.get_running_loop()) - self._oldest(queue).enqueued_at >= self._delay:
            self.stats.flush_delay += 1
        else:
            # wait for company while it keeps coming: look again next turn, and flush once a
            # whole turn brought no arrival (the burst is over) or the oldest waited enough.
            # The first look always finds the arrival that brought us here, so the quiet turn
            # it then waits for is a whole one.
            if queue.turn is None:
                queue.turn = asyncio.get_running_loop().call_soon(self._on_turn, queue)
            return
        if queue.turn is not None:
            queue.turn.cancel()
            queue.turn = None
        queue.running += 1
        queue.starting = True
        task = asyncio.get_running_loop().create_task(self._run(queue))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_turn(self, queue: _Queue) -> None:
        queue.turn = None
        queue.quiet = queue.arrivals == queue.seen
        queue.seen = queue.arrivals
        try:
            self._dispatch(queue)
        finally:
            queue.quiet = False

    @staticmethod
    def _oldest(queue: _Queue) -> _Pending:
        while not queue.items[0].queued:
            queue.items.popleft()
        return queue.items[0]

    def _take(self, queue: _Queue) -> list[_Pending]:
        """Pops the next batch in arrival order: as many requests as fit in the row limit,
        at least one (a request bigger than the limit runs alone)."""
        members: list[_Pending] = []
        rows = 0
        items = queue.items
        while items:
            pending = items[0]
            if not pending.queued:
                items.popleft()
                continue
            if members and (not queue.max_rows or rows + pending.rows > queue.max_rows):
                break
            items.popleft()
            self._unqueue(queue, pending)
            members.append(pending)
            rows += pending.rows
        return members

    @staticmethod
    def _unqueue(queue: _Queue, pending: _Pending) -> None:
        pending.queued = False
        queue.queued -= 1
        queue.queued_rows -= pending.rows

    def _forget_if_idle(self, queue: _Queue) -> None:
        # keys carry shapes and output lists, so queues come and go: keep only live ones
        if not queue.queued and not queue.running and self._queues.get(queue.key) is queue:
            if queue.turn is not None:
                queue.turn.cancel()
            del self._queues[queue.key]

    # execution

    async def _run(self, queue: _Queue) -> None:
        members: list[_Pending] = []
        try:
            queue.starting = False
            members = self._take(queue)
            self._dispatch(queue)  # what did not fit may use another free slot
            live = self._live(members)
            if live:
                self.stats.batches += 1
                self.stats.requests += len(live)
                rows = sum(m.rows for m in live)
                self.stats.rows += rows
                _observe(live, rows, full=queue.queued > 0, now=self._now(asyncio.get_running_loop()))
                with _batch_span(live, rows, queue.attributes):
                    await self._execute_isolating(live, batching=queue.max_rows > 0)
        finally:
            # only reached with undone members when this task was cancelled
            for pending in members:
                if not pending.future.done():
                    _fail(pending, Unavailable("the batch was abandoned", reason="SHUTTING_DOWN"))
            queue.running -= 1
            self._dispatch(queue)
            self._forget_if_idle(queue)

    async def _execute_isolating(self, members: list[_Pending], *, batching: bool) -> None:
        """Runs ``members`` as one call; if it fails for a reason one of them may cause,
        runs each half again (bisection: one bad request among n costs about 2·log2(n)
        extra calls) until the failures are pinned on single requests."""
        try:
            outputs = await self._call(members)
        except Exception as exc:
            if len(members) == 1 or not is_request_fault(exc):
                for pending in members:
                    _fail(pending, exc)
                return
            self.stats.isolations += 1
            log.debug("batch of %d failed (%r); re-running it in halves", len(members), exc)
            middle = len(members) // 2
            for half in (members[:middle], members[middle:]):
                live = self._live(half)
                if live:
                    await self._execute_isolating(live, batching=batching)
            return
        try:
            results = _split(members, outputs) if batching else [outputs]
        except BatchShapeError as exc:
            log.error("%s", exc)
            for pending in members:
                _fail(pending, exc)
            return
        for pending, result in zip(members, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    async def _call(self, members: list[_Pending]) -> Outputs:
        first = members[0]
        if len(members) == 1:
            inputs = first.inputs
        else:
            # inside the caller's try: inputs that cannot be joined fail the batch and are
            # re-run apart, where nothing is joined
            inputs = {
                name: np.concatenate([m.inputs[name] for m in members], axis=0) for name in first.inputs
            }
        self.stats.executions += 1
        return await first.execute(inputs, self._timeout(members))

    def _timeout(self, members: list[_Pending]) -> float:
        latest = 0.0
        for pending in members:
            if pending.deadline is None:
                return self._timeout_cap
            latest = max(latest, pending.deadline)
        return max(0.0, min(self._timeout_cap, latest - self._now(asyncio.get_running_loop())))

    def _live(self, members: list[_Pending]) -> list[_Pending]:
        """Members still waiting for a result; those whose deadline passed get
        ``DeadlineExceeded`` here, before the backend sees them."""
        now = self._now(asyncio.get_running_loop())
        live: list[_Pending] = []
        for pending in members:
            if pending.future.done():
                continue
            if pending.deadline is not None and pending.deadline <= now:
                self.stats.expired += 1
                _fail(pending, DeadlineExceeded("the deadline passed before the batch ran"))
                continue
            live.append(pending)
        return live

    # helpers

    def _now(self, loop: asyncio.AbstractEventLoop) -> float:
        return self._clock() if self._clock is not None else loop.time()


def _fail(pending: _Pending, exc: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(exc)


def _split(members: list[_Pending], outputs: Outputs) -> list[Outputs]:
    """Each member's rows of every output, as views (no copies)."""
    total = sum(m.rows for m in members)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise BatchShapeError(
                f"the backend returned output {name!r} with shape {array.shape} for a batch of {total} rows"
            )
    if len(members) == 1:
        return [outputs]
    results: list[Outputs] = []
    start = 0
    for pending in members:
        stop = start + pending.rows
        results.append({name: array[start:stop] for name, array in outputs.items()})
        start = stop
    return results


def _observe(members: list[_Pending], rows: int, *, full: bool, now: float) -> None:
    metrics.BATCHES.labels("full" if full else "drained").inc()
    metrics.BATCH_ROWS.observe(rows)
    for pending in members:
        metrics.BATCH_QUEUE_SECONDS.observe(now - pending.enqueued_at)


@contextlib.contextmanager
def _batch_span(
    members: list[_Pending], rows: int, attributes: Mapping[str, AttributeValue]
) -> Iterator[trace.Span]:
    """The span of one executed batch: a child of its first sampled member's span (so a lone
    request's trace holds its batch and the backend's spans), linked to every member's. Each
    sampled member also gets a ``queue wait`` span, from its arrival until now.

    The batch runs in this span's context alone: the task it runs in was started by some
    request and would otherwise carry that request's context into the backend's spans."""
    started = time.time_ns()
    for pending in members:
        if pending.enqueued_ns:
            parent = trace.set_span_in_context(NonRecordingSpan(pending.span_context))
            wait = _tracer.start_span("queue wait", context=parent, start_time=pending.enqueued_ns)
            wait.end(end_time=started)
    contexts = [m.span_context for m in members if m.span_context.is_valid]
    if not contexts:
        # no member is in a trace (no SDK here, and no caller sent a traceparent)
        token = otel_context.attach(otel_context.Context())
        try:
            yield trace.INVALID_SPAN
        finally:
            otel_context.detach(token)
        return
    first = next((c for c in contexts if c.trace_flags.sampled), contexts[0])
    with _tracer.start_as_current_span(
        "batch",
        context=trace.set_span_in_context(NonRecordingSpan(first)),
        links=[Link(c) for c in contexts],
        attributes={**attributes, "scoremesh.batch_size": rows, "scoremesh.batch_requests": len(members)},
    ) as span:
        yield span


def _rows_of(inputs: Mapping[str, Array], *, batching: bool) -> int:
    if not batching:
        return 1
    rows: int | None = None
    for name, array in inputs.items():
        if array.ndim == 0:
            raise InvalidArgument.for_field(f"inputs.{name}", "has no batch dimension")
        if rows is None:
            rows = int(array.shape[0])
        elif array.shape[0] != rows:
            raise InvalidArgument.for_field(
                f"inputs.{name}", f"has {array.shape[0]} rows where other inputs have {rows}"
            )
    if rows is None:
        raise InvalidArgument.for_field("inputs", "no inputs given")
    return rows
