"""Waiting for rows other processes commit, woken by PostgreSQL's LISTEN/NOTIFY.

A writer inserts into an append-only table with an increasing id and, in the same
transaction, runs ``pg_notify(channel, id)``. Readers keep a cursor (the last id they read)
and call :meth:`EventListener.wait_beyond`; they read the rows themselves, so a missed
notification only delays them until the next one or their own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

log = logging.getLogger(__name__)

RECONNECT_DELAY_S = 1.0


class EventListener:
    """One LISTEN connection per process that tells waiting readers the newest id announced
    on ``channel``. ``head_query`` returns the newest id in the table: it is read on every
    (re)connect, since rows committed while nobody listened were announced to nobody. The
    connection is re-opened when it drops."""

    def __init__(self, dsn: str, channel: str, head_query: str, *, name: str) -> None:
        self._dsn = dsn
        self._channel = channel
        self._head_query = head_query
        self._name = name
        self._latest = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def latest(self) -> int:
        """The newest id announced so far (0 before the first)."""
        return self._latest

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_beyond(self, cursor: int, timeout: float) -> None:
        """Returns once an id newer than ``cursor`` was announced, or after ``timeout``."""
        if self._latest > cursor:
            return
        wakeup = self._wakeup
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), timeout)

    def _announce(self, event_id: int) -> None:
        if event_id > self._latest:
            self._latest = event_id
            self._wakeup.set()
            self._wakeup = asyncio.Event()

    async def _run(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn)
                lost = asyncio.Event()

                def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
                    self._announce(int(payload))

                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self._channel, on_notify)
                # rows committed while we were not listening: wake everyone to re-read
                self._announce(await conn.fetchval(self._head_query))
                await lost.wait()
                log.warning("%s: listener connection lost; reconnecting", self._name)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning(
                    "%s: listener failed (%s); retrying in %.0f s", self._name, error, RECONNECT_DELAY_S
                )
                await asyncio.sleep(RECONNECT_DELAY_S)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))
