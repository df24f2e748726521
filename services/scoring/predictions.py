"""The prediction log and the feedback given on predictions, in PostgreSQL.

Two sides share one table layout (``migrations/0001_predictions.sql``):

* :class:`PredictionLog` is the scoring hot path's side. ``record`` is synchronous and
  O(1): it samples, then appends references to the arrays to a bounded queue; one background
  task encodes queued predictions (off the event loop) and writes them in batches. A full
  queue drops and counts; a failed write is logged and counted. Scorers never wait on, nor
  see errors from, the database.
* :class:`PredictionStore` answers the ``scoremesh.scoring.v1.Scoring`` API: feedback, and
  reading logged predictions back with their feedback, one tenant at a time.

Tensors are kept as the Open Inference Protocol lays them out (:class:`LoggedTensor`);
:func:`from_numpy` and :func:`to_numpy` are the one conversion to and from numpy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import math
import random
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import numpy.typing as npt

from services.mesh import paging
from services.mesh.errors import FieldViolation, InvalidArgument, NotFound, raise_for_violations
from services.mesh.identity import Caller
from services.mesh.migrations import migrated_pool
from services.mesh.postgres import translated_errors
from services.scoring import tensors

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS: Final = 256
MAX_LABEL_CHARS: Final = 4096
MAX_TENSOR_NAME_CHARS: Final = 256
MAX_FEEDBACK_TENSOR_BYTES: Final = 8 * 1024**2
MAX_RANK: Final = 16


# tensors


DATATYPES: Final = frozenset(tensors.NUMPY_DTYPES)
"""The Open Inference Protocol datatypes a logged tensor may have."""


@dataclass(frozen=True, slots=True)
class LoggedTensor:
    """A tensor as the log keeps it: ``raw`` holds the little-endian contents in row-major
    order, BYTES elements each prefixed by their 4-byte little-endian length."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes = field(repr=False)


def from_numpy(name: str, array: npt.NDArray[Any]) -> LoggedTensor:
    """``array`` as a :class:`LoggedTensor`, in the protocol's raw layout
    (``tensors.raw_bytes``). Raises ``TypeError`` for dtypes the protocol has no name for."""
    return LoggedTensor(
        name, tensors.datatype_of(array), tuple(int(d) for d in array.shape), tensors.raw_bytes(array)
    )


def to_numpy(tensor: LoggedTensor) -> npt.NDArray[Any]:
    """The tensor as a writable numpy array: BYTES become an object array of ``bytes``, BF16
    an ``ml_dtypes.bfloat16`` array. Raises ``ValueError`` when the contents do not match the
    datatype and shape (a tensor the store returned always does)."""
    if tensor.datatype not in DATATYPES:
        raise ValueError(f"unknown datatype {tensor.datatype!r}")
    problem = _raw_problem(tensor)
    if problem:
        raise ValueError(problem)
    return tensors.from_raw(tensor.raw, tensor.datatype, tensor.shape).copy()


def _raw_problem(tensor: LoggedTensor) -> str:
    """What is wrong with the raw contents for the tensor's datatype and shape, or ""."""
    count = math.prod(tensor.shape)
    if tensor.datatype == tensors.BYTES:
        return tensors.split_bytes(tensor.raw, count)[1]
    expected = count * tensors.NUMPY_DTYPES[tensor.datatype].itemsize
    if len(tensor.raw) != expected:
        shape = list(tensor.shape)
        return f"holds {len(tensor.raw)} bytes; shape {shape} of {tensor.datatype} needs {expected}"
    return ""


def check_tensor(tensor: LoggedTensor, field_path: str) -> list[FieldViolation]:
    """What is wrong with a tensor that arrived from outside, as violations of
    ``{field_path}.datatype``, ``.shape``, ``.raw_contents`` and ``.name``."""
    violations: list[FieldViolation] = []
    if len(tensor.name) > MAX_TENSOR_NAME_CHARS or "\x00" in tensor.name:
        violations.append(
            FieldViolation(
                f"{field_path}.name", f"must be at most {MAX_TENSOR_NAME_CHARS} characters, no NUL"
            )
        )
    if tensor.datatype not in DATATYPES:
        violations.append(
            FieldViolation(f"{field_path}.datatype", f"must be one of {', '.join(sorted(DATATYPES))}")
        )
    if len(tensor.shape) > MAX_RANK or any(d < 0 for d in tensor.shape):
        violations.append(
            FieldViolation(f"{field_path}.shape", f"must have at most {MAX_RANK} non-negative dimensions")
        )
    if len(tensor.raw) > MAX_FEEDBACK_TENSOR_BYTES:
        violations.append(
            FieldViolation(f"{field_path}.raw_contents", f"must be at most {MAX_FEEDBACK_TENSOR_BYTES} bytes")
        )
    if violations:
        return violations
    problem = _raw_problem(tensor)
    if problem:
        violations.append(FieldViolation(f"{field_path}.raw_contents", problem))
    return violations


# domain objects


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """Feedback on one prediction: a ``label`` or a ``tensor`` (exactly one is set).
    ``model`` and ``version`` are those of the prediction when it is logged ('' and 0
    otherwise)."""

    id: int
    request_id: str
    label: str | None
    tensor: LoggedTensor | None
    created_by: str
    create_time: datetime
    model: str = ""
    version: int = 0


@dataclass(frozen=True, slots=True)
class Prediction:
    """One logged prediction with the feedback given on it, oldest first."""

    request_id: str
    tenant: str
    model: str
    version: int
    backend: str
    inputs: tuple[LoggedTensor, ...]
    outputs: tuple[LoggedTensor, ...]
    create_time: datetime
    feedback: tuple[FeedbackRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class PredictionPage:
    predictions: tuple[Prediction, ...]
    next_page_token: str


# the store


_PREDICTION_COLUMNS = "request_id, tenant, model, version, backend, inputs, outputs, create_time"
_FEEDBACK_COLUMNS = "id, request_id, label, tensor, created_by, create_time"


def _tensor_row(tensor: LoggedTensor) -> tuple[str, str, list[int], bytes]:
    return (tensor.name, tensor.datatype, list(tensor.shape), tensor.raw)


def _tensor(record: asyncpg.Record | tuple[Any, ...]) -> LoggedTensor:
    name, datatype, shape, contents = tuple(record)
    return LoggedTensor(name, datatype, tuple(shape), bytes(contents))


def _prediction(row: asyncpg.Record, feedback: Sequence[FeedbackRecord]) -> Prediction:
    return Prediction(
        request_id=row["request_id"],
        tenant=row["tenant"],
        model=row["model"],
        version=row["version"],
        backend=row["backend"],
        inputs=tuple(_tensor(t) for t in row["inputs"]),
        outputs=tuple(_tensor(t) for t in row["outputs"]),
        create_time=row["create_time"],
        feedback=tuple(dataclasses.replace(f, model=row["model"], version=row["version"]) for f in feedback),
    )


def _feedback(row: asyncpg.Record, model: str = "", version: int = 0) -> FeedbackRecord:
    tensor = row["tensor"]
    return FeedbackRecord(
        id=row["id"],
        request_id=row["request_id"],
        label=row["label"],
        tensor=_tensor(tensor) if tensor is not None else None,
        created_by=row["created_by"],
        create_time=row["create_time"],
        model=model,
        version=version,
    )


def _check_request_id(request_id: str, field_path: str) -> list[FieldViolation]:
    if not request_id:
        return [FieldViolation(field_path, "is required")]
    if len(request_id) > MAX_REQUEST_ID_CHARS or "\x00" in request_id:
        return [FieldViolation(field_path, f"must be at most {MAX_REQUEST_ID_CHARS} characters, no NUL")]
    return []


def _micros(value: datetime) -> int:
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_micros(micros: int) -> datetime:
    seconds, rest = divmod(micros, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest)


@dataclass(frozen=True, slots=True)
class _PageToken:
    """Where the next page starts (after ``create_time``, ``request_id`` in newest-first
    order), and the query it belongs to: a token is refused with other filters (AIP-158)."""

    create_time_us: int
    request_id: str
    query: tuple[str, int, bool]

    def encode(self) -> str:
        payload = json.dumps([self.create_time_us, self.request_id, *self.query], separators=(",", ":"))
        return base64.urlsafe_b64encode(payload.encode()).decode()

    @classmethod
    def decode(cls, token: str, query: tuple[str, int, bool]) -> _PageToken:
        try:
            payload = json.loads(base64.b64decode(token.encode(), altchars=b"-_", validate=True))
        except (binascii.Error, UnicodeDecodeError, ValueError) as error:
            raise InvalidArgument.for_field("page_token", "is not a token this service issued") from error
        match payload:
            case [int() as micros, str() as request_id, str() as model, int() as version, bool() as only]:
                if not request_id or isinstance(micros, bool) or isinstance(version, bool):
                    raise InvalidArgument.for_field("page_token", "is not a token this service issued")
                if (model, version, only) != query:
                    raise InvalidArgument.for_field(
                        "page_token", "was issued for another model, version or with_feedback_only"
                    )
                return cls(micros, request_id, query)
        raise InvalidArgument.for_field("page_token", "is not a token this service issued")


class PredictionStore:
    """Logged predictions and feedback in PostgreSQL, seen one tenant at a time: another
    tenant's predictions read as not found."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 1, max_size: int = 4) -> PredictionStore:
        """Connects and applies pending migrations (safe with several replicas starting at once)."""
        pool = await migrated_pool(
            dsn,
            component="scoring",
            package="services.scoring.migrations",
            min_size=min_size,
            max_size=max_size,
        )
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def write_predictions(self, predictions: Sequence[Prediction]) -> None:
        """Inserts ``predictions`` in one transaction (their feedback is ignored); a request id
        that is already logged keeps its first row. Raises asyncpg's errors untranslated:
        only :class:`PredictionLog` calls this, and it counts failures."""
        await self._pool.executemany(
            f"""INSERT INTO predictions ({_PREDICTION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                ON CONFLICT (request_id) DO NOTHING""",
            [
                (
                    p.request_id,
                    p.tenant,
                    p.model,
                    p.version,
                    p.backend,
                    [_tensor_row(t) for t in p.inputs],
                    [_tensor_row(t) for t in p.outputs],
                    p.create_time,
                )
                for p in predictions
            ],
        )

    async def create_feedback(
        self,
        caller: Caller,
        request_id: str,
        *,
        label: str | None = None,
        tensor: LoggedTensor | None = None,
    ) -> FeedbackRecord:
        """Records ``caller``'s feedback (exactly one of ``label`` and ``tensor``) on the
        prediction ``request_id``, which need not be logged (yet). INVALID_ARGUMENT names the
        bad ``feedback.*`` fields; NOT_FOUND when another tenant's prediction has this id."""
        violations = _check_request_id(request_id, "feedback.request_id")
        if label is None and tensor is None:
            violations.append(FieldViolation("feedback.label", "a label or a tensor is required"))
        elif label is not None and tensor is not None:
            violations.append(FieldViolation("feedback.tensor", "only one of label and tensor may be set"))
        elif label is not None and (not label or len(label) > MAX_LABEL_CHARS or "\x00" in label):
            violations.append(
                FieldViolation("feedback.label", f"must be 1 to {MAX_LABEL_CHARS} characters, no NUL")
            )
        elif tensor is not None:
            violations += check_tensor(tensor, "feedback.tensor")
        raise_for_violations(violations)
        async with translated_errors():
            # one statement, so that the ownership check and the insert see the same snapshot
            row = await self._pool.fetchrow(
                f"""WITH owner AS (SELECT tenant, model, version FROM predictions WHERE request_id = $1),
                    inserted AS (
                        INSERT INTO feedback (request_id, tenant, label, tensor, created_by)
                        SELECT $1, $2, $3, $4, $5
                        WHERE NOT EXISTS (SELECT 1 FROM owner WHERE tenant <> $2)
                        RETURNING {_FEEDBACK_COLUMNS})
                    SELECT inserted.*, owner.model, owner.version FROM inserted LEFT JOIN owner ON true""",
                request_id,
                caller.tenant,
                label,
                _tensor_row(tensor) if tensor is not None else None,
                caller.principal,
            )
        if row is None:
            raise _prediction_not_found(request_id)
        return _feedback(row, row["model"] or "", row["version"] or 0)

    async def get_prediction(self, caller: Caller, request_id: str) -> Prediction:
        """The logged prediction with its feedback; NOT_FOUND when it is not logged, or logged
        for another tenant (the two look alike on purpose)."""
        raise_for_violations(_check_request_id(request_id, "request_id"))
        async with translated_errors(), self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_PREDICTION_COLUMNS} FROM predictions WHERE request_id = $1 AND tenant = $2",
                request_id,
                caller.tenant,
            )
            if row is None:
                raise _prediction_not_found(request_id)
            feedback = await conn.fetch(
                f"""SELECT {_FEEDBACK_COLUMNS} FROM feedback WHERE tenant = $1 AND request_id = $2
                    ORDER BY id""",
                caller.tenant,
                request_id,
            )
        return _prediction(row, [_feedback(f) for f in feedback])

    async def list_predictions(
        self,
        caller: Caller,
        model: str,
        *,
        version: int = 0,
        with_feedback_only: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> PredictionPage:
        """``caller``'s logged predictions of ``model`` (of ``version`` unless 0), newest first,
        each with its feedback; ``page_size`` 0 means 100, at most 1000. A page token works
        only with the filters it was issued for."""
        violations = [] if model else [FieldViolation("model", "is required")]
        if version < 0:
            violations.append(FieldViolation("version", "must be 0 (all versions) or a version number"))
        raise_for_violations(violations)
        limit = paging.page_size(page_size)
        query = (model, version, with_feedback_only)
        after = _PageToken.decode(page_token, query) if page_token else None
        conditions = ["p.tenant = $1", "p.model = $2"]
        args: list[Any] = [caller.tenant, model]
        if version:
            args.append(version)
            conditions.append(f"p.version = ${len(args)}")
        if after is not None:
            args += [_from_micros(after.create_time_us), after.request_id]
            conditions.append(f"(p.create_time, p.request_id) < (${len(args) - 1}, ${len(args)})")
        if with_feedback_only:
            conditions.append(
                "EXISTS (SELECT 1 FROM feedback f WHERE f.tenant = p.tenant AND f.request_id = p.request_id)"
            )
        args.append(limit + 1)
        async with translated_errors(), self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"""SELECT {_PREDICTION_COLUMNS} FROM predictions p WHERE {" AND ".join(conditions)}
                    ORDER BY p.create_time DESC, p.request_id DESC LIMIT ${len(args)}""",
                *args,
            )
            kept = rows[:limit]
            feedback_rows = await conn.fetch(
                f"""SELECT {_FEEDBACK_COLUMNS} FROM feedback
                    WHERE tenant = $1 AND request_id = ANY($2::text[]) ORDER BY id""",
                caller.tenant,
                [row["request_id"] for row in kept],
            )
        feedback: dict[str, list[FeedbackRecord]] = {}
        for f in feedback_rows:
            feedback.setdefault(f["request_id"], []).append(_feedback(f))
        predictions = tuple(_prediction(row, feedback.get(row["request_id"], ())) for row in kept)
        token = ""
        if len(rows) > limit:
            last = predictions[-1]
            token = _PageToken(_micros(last.create_time), last.request_id, query).encode()
        return PredictionPage(predictions, token)


def _prediction_not_found(request_id: str) -> NotFound:
    return NotFound(
        f"no logged prediction {request_id!r}",
        reason="PREDICTION_NOT_FOUND",
        metadata={"request_id": request_id},
    )


# the log


@dataclass(frozen=True, slots=True)
class PredictionLogStats:
    """Counts since the log was built. ``sampled_out`` were not chosen by the rate;
    ``dropped`` were chosen but found the queue full; ``written`` reached the database;
    ``failed`` were lost to a write error or could not be encoded."""

    sampled_out: int
    queued: int
    dropped: int
    written: int
    failed: int
    pending: int


@dataclass(frozen=True, slots=True)
class _Pending:
    tenant: str
    request_id: str
    model: str
    version: int
    backend: str
    inputs: Mapping[str, npt.NDArray[Any]]
    outputs: Mapping[str, npt.NDArray[Any]]
    create_time: datetime
    nbytes: int


def _encode(pending: Sequence[_Pending]) -> tuple[list[Prediction], int]:
    """The predictions that can be logged, and how many could not (runs in an executor)."""
    encoded: list[Prediction] = []
    for item in pending:
        try:
            names = [item.request_id, item.model, item.backend, *item.inputs, *item.outputs]
            if len(item.request_id) > MAX_REQUEST_ID_CHARS or any("\x00" in n for n in names):
                raise ValueError("a request id, model, backend or tensor name is too long or holds NUL")
            encoded.append(
                Prediction(
                    request_id=item.request_id,
                    tenant=item.tenant,
                    model=item.model,
                    version=item.version,
                    backend=item.backend,
                    inputs=tuple(from_numpy(n, a) for n, a in item.inputs.items()),
                    outputs=tuple(from_numpy(n, a) for n, a in item.outputs.items()),
                    create_time=item.create_time,
                )
            )
        except (TypeError, ValueError, struct.error) as error:
            log.warning("prediction %r cannot be logged: %s", item.request_id, error)
    return encoded, len(pending) - len(encoded)


class PredictionLog:
    """The scorers' side of the prediction log: sampled, bounded, batched, never blocking.

    ``rate`` (``SCOREMESH_PREDICTION_LOG_RATE``) is the share of predictions logged, in
    [0, 1]; ``rng`` draws the samples (seed one in tests). At most ``max_queue`` predictions
    and about ``max_queue_bytes`` of their arrays wait; more are dropped and counted. One task
    writes up to ``batch_size`` predictions at a time, as soon as that many wait or
    ``flush_interval_s`` after the first one queued. Encoding runs on ``executor`` (default:
    the loop's), keeping large tensors off the event loop.

    Call :meth:`start` in a running loop, :meth:`close` at shutdown (after the server stopped,
    before the store closes).
    """

    def __init__(
        self,
        store: PredictionStore,
        *,
        rate: float,
        rng: random.Random | None = None,
        max_queue: int = 10_000,
        max_queue_bytes: int = 256 * 1024**2,
        batch_size: int = 500,
        flush_interval_s: float = 0.1,
        executor: Executor | None = None,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], not {rate}")
        if max_queue < 1 or batch_size < 1 or flush_interval_s <= 0:
            raise ValueError("max_queue and batch_size must be positive, flush_interval_s above 0")
        self._store = store
        self._rate = rate
        self._rng = rng or random.Random()
        self._max_queue = max_queue
        self._max_queue_bytes = max_queue_bytes
        self._batch_size = batch_size
        self._interval = flush_interval_s
        self._executor = executor
        self._queue: deque[_Pending] = deque()
        self._queued_bytes = 0
        self._nonempty = asyncio.Event()
        self._batch_ready = asyncio.Event()
        # the writer task and flush() take turns draining, so a flush waits for a batch in flight
        self._drain_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._sampled_out = self._queued = self._dropped = self._written = self._failed = 0

    @property
    def stats(self) -> PredictionLogStats:
        return PredictionLogStats(
            sampled_out=self._sampled_out,
            queued=self._queued,
            dropped=self._dropped,
            written=self._written,
            failed=self._failed,
            pending=len(self._queue),
        )

    def start(self) -> None:
        """Starts the writer task (in the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="prediction-log-writer")

    def record(
        self,
        caller: Caller,
        request_id: str,
        model: str,
        version: int,
        backend: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: Mapping[str, npt.NDArray[Any]],
    ) -> bool:
        """Queues one served prediction if the sample picks it and there is room; returns
        whether it was queued. Keeps references to the arrays, which the caller must not
        change afterwards. Never blocks and never raises for the database's sake."""
        if self._closing or not request_id:
            return False
        if self._rate < 1.0 and (self._rate == 0.0 or self._rng.random() >= self._rate):
            self._sampled_out += 1
            return False
        nbytes = sum(a.nbytes for a in inputs.values()) + sum(a.nbytes for a in outputs.values())
        if len(self._queue) >= self._max_queue or (
            self._queue and self._queued_bytes + nbytes > self._max_queue_bytes
        ):
            self._dropped += 1
            if self._dropped & (self._dropped - 1) == 0:  # 1, 2, 4, 8…: a full queue must not flood the log
                log.warning("prediction log queue full; %d predictions dropped so far", self._dropped)
            return False
        self._queue.append(
            _Pending(
                caller.tenant,
                request_id,
                model,
                version,
                backend,
                dict(inputs),
                dict(outputs),
                datetime.now(UTC),
                nbytes,
            )
        )
        self._queued += 1
        self._queued_bytes += nbytes
        self._nonempty.set()
        if len(self._queue) >= self._batch_size:
            self._batch_ready.set()
        return True

    async def flush(self) -> None:
        """Returns once every prediction queued before the call was written or counted failed."""
        async with self._drain_lock:
            await self._drain()

    async def close(self) -> None:
        """Stops taking predictions, writes those queued, then stops the writer. Finishes even
        if the caller is cancelled meanwhile."""
        self._closing = True
        await asyncio.shield(self._close())

    async def _close(self) -> None:
        if self._task is not None:
            self._nonempty.set()
            self._batch_ready.set()
            await self._task
        await self.flush()

    async def _run(self) -> None:
        while not self._closing:
            await self._nonempty.wait()
            # give a batch the interval to fill up, unless it is full already
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._batch_ready.wait()
            async with self._drain_lock:
                await self._drain()

    async def _drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            self._queued_bytes -= sum(item.nbytes for item in batch)
            if len(self._queue) < self._batch_size:
                self._batch_ready.clear()
            if not self._queue:
                self._nonempty.clear()
            await self._write(batch)

    async def _write(self, batch: Sequence[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            predictions, unencodable = await loop.run_in_executor(self._executor, _encode, batch)
        except Exception:
            # _encode handles each prediction's own errors: this is the executor failing
            log.exception("encoding %d logged predictions failed", len(batch))
            self._failed += len(batch)
            return
        self._failed += unencodable
        if not predictions:
            return
        try:
            await self._store.write_predictions(predictions)
        except Exception as error:
            # scorers must not see this; the counter and the log line are how it shows
            self._failed += len(predictions)
            log.error(
                "writing %d logged predictions failed: %s: %s", len(predictions), type(error).__name__, error
            )
            return
        self._written += len(predictions)
