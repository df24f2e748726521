"""API keys: how a caller proves who it is to the gateway, and what it may do.

A key reads ``smk_<id>_<secret>``: ``id`` is 12 hex characters, public (listings, logs and
usage name keys by it); ``secret`` is 43 base62 characters drawn by :mod:`secrets` (about 256
bits). PostgreSQL keeps only ``sha256(key)``; the plaintext is shown once, when the key is
created.

Why sha256 and not bcrypt or argon2: slow hashes protect low-entropy secrets (passwords) from
guessing once the hashes leak. A 256-bit random secret cannot be guessed at any hash speed,
so a slow hash would only add milliseconds of CPU to every cache miss on the request path.

:class:`KeyStore` is the gateway's PostgreSQL adapter: the ``api_keys`` table, and the
``usage`` table that :class:`services.gateway.quotas.UsageRecorder` writes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import enum
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import string
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import asyncpg

from services.mesh import paging
from services.mesh.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    raise_for_violations,
)
from services.mesh.identity import DEFAULT_TENANT
from services.mesh.migrations import migrated_pool
from services.mesh.postgres import translated_errors

log = logging.getLogger(__name__)

KEY_PREFIX: Final = "smk"
ID_CHARS: Final = 12
SECRET_CHARS: Final = 43
"""43 base62 characters hold 256 bits (43 * log2(62) > 256)."""
ADMIN_KEY_FILE: Final = "admin.key"
MAX_TENANT_CHARS: Final = 63
MAX_DESCRIPTION_CHARS: Final = 1024
MAX_REQUESTS_PER_SECOND: Final = 1_000_000.0
MAX_BURST: Final = 1_000_000
CACHE_TTL_S: Final = 5.0
"""How long a key found valid is trusted without asking PostgreSQL again; a key revoked
through another gateway process keeps working here for at most this long."""
CACHE_MAX_KEYS: Final = 10_000

_BASE62: Final = string.digits + string.ascii_letters
_KEY_PATTERN: Final = re.compile(
    rf"{KEY_PREFIX}_(?P<id>[0-9a-f]{{{ID_CHARS}}})_(?P<secret>[0-9A-Za-z]{{{SECRET_CHARS}}})"
)
_TENANT_PATTERN: Final = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_TENANT_CHARS - 1}}}")
# last_used_time is a hint for people ("is this key still in use?"): minute precision spares
# PostgreSQL a write per cache miss
_LAST_USED_PRECISION: Final = "1 minute"


class Scope(enum.StrEnum):
    """What a key may do. Scopes are checked literally: ``admin`` (keys and usage) does not
    imply the others; the admin key that ``scoremesh up`` creates holds every scope."""

    MODELS_READ = "models:read"
    MODELS_WRITE = "models:write"
    SCORE = "score"
    TRAIN = "train"
    ADMIN = "admin"


_SCOPE_NAMES: Final = frozenset(s.value for s in Scope)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: ``requests_per_second`` sustained, up to ``burst`` at once."""

    requests_per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as stored, without its secret. ``rate`` None: the gateway's default rate."""

    id: str
    tenant: str
    scopes: frozenset[Scope]
    description: str
    created_by: str
    create_time: datetime
    revoke_time: datetime | None = None
    last_used_time: datetime | None = None
    rate: RateLimit | None = None

    @property
    def revoked(self) -> bool:
        return self.revoke_time is not None


@dataclass(frozen=True, slots=True)
class KeyPage:
    keys: tuple[ApiKey, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class UsageRow:
    """What one key did with one model in one hour (``bucket``, its start), or counts to add
    to that. ``model`` is '' for requests that name no model."""

    key_id: str
    tenant: str
    model: str
    bucket: datetime
    requests: int
    rows: int


# the key format


def _hash(plaintext: str) -> bytes:
    return hashlib.sha256(plaintext.encode()).digest()


def new_key() -> tuple[str, str]:
    """A fresh key id and the whole plaintext key."""
    key_id = secrets.token_hex(ID_CHARS // 2)
    secret = "".join(secrets.choice(_BASE62) for _ in range(SECRET_CHARS))
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


def key_id_of(plaintext: str) -> str:
    """The id in a plaintext key; Unauthenticated (API_KEY_MALFORMED) when it is not one."""
    match = _KEY_PATTERN.fullmatch(plaintext)
    if match is None:
        raise Unauthenticated(
            f"the credential is not a scoremesh API key ({KEY_PREFIX}_<id>_<secret>)",
            reason="API_KEY_MALFORMED",
        )
    return match["id"]


def bearer_token(authorization: str | None) -> str:
    """The key in an ``Authorization`` header value (``Bearer <key>``, the scheme in any
    case). Unauthenticated when the header is missing (API_KEY_MISSING) or not a bearer
    credential (API_KEY_MALFORMED); the key's own format is checked by authenticate."""
    if not authorization or not authorization.strip():
        raise Unauthenticated(
            "an API key is required: send 'Authorization: Bearer <key>'", reason="API_KEY_MISSING"
        )
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the Authorization header must read 'Bearer <key>'", reason="API_KEY_MALFORMED")
    return token


def require(key: ApiKey, scope: Scope) -> None:
    """PermissionDenied (MISSING_SCOPE, naming the scope) unless ``key`` holds ``scope``."""
    if scope not in key.scopes:
        raise PermissionDenied(
            f"API key {key.id} lacks the scope {scope.value!r}",
            reason="MISSING_SCOPE",
            metadata={"scope": scope.value, "key_id": key.id},
        )


# validation


def parse_scopes(
    scopes: Iterable[str], field: str = "scopes"
) -> tuple[frozenset[Scope], list[FieldViolation]]:
    """Scope names (``models:read``, …) as :class:`Scope` values, and violations of ``field``
    for unknown or missing ones."""
    parsed: set[Scope] = set()
    unknown: list[str] = []
    # one name alone, not its characters
    for name in [scopes] if isinstance(scopes, str) else scopes:
        try:
            parsed.add(Scope(name))
        except ValueError:
            unknown.append(name)
    violations: list[FieldViolation] = []
    known = ", ".join(s.value for s in Scope)
    if unknown:
        violations.append(
            FieldViolation(field, f"unknown scopes {', '.join(map(repr, unknown))}; known: {known}")
        )
    elif not parsed:
        violations.append(FieldViolation(field, f"at least one scope is required, of {known}"))
    return frozenset(parsed), violations


def _check_new_key(
    tenant: str, description: str, created_by: str, rate: RateLimit | None
) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not _TENANT_PATTERN.fullmatch(tenant):
        violations.append(
            FieldViolation(
                "tenant",
                f"must be 1 to {MAX_TENANT_CHARS} letters, digits, '.', '_' or '-', starting with a "
                "letter or digit",
            )
        )
    if len(description) > MAX_DESCRIPTION_CHARS or "\x00" in description:
        violations.append(
            FieldViolation("description", f"must be at most {MAX_DESCRIPTION_CHARS} characters, no NUL")
        )
    if not created_by or "\x00" in created_by:
        violations.append(FieldViolation("created_by", "is required, without NUL"))
    if rate is not None:
        per_second = rate.requests_per_second
        if not (math.isfinite(per_second) and 0 < per_second <= MAX_REQUESTS_PER_SECOND):
            violations.append(
                FieldViolation(
                    "rate.requests_per_second", f"must be above 0 and at most {MAX_REQUESTS_PER_SECOND:g}"
                )
            )
        # a bool is an int to Python, and 2.5 compares fine: neither is a burst
        burst = rate.burst
        if type(burst) is not int or not 1 <= burst <= MAX_BURST:
            violations.append(FieldViolation("rate.burst", f"must be a whole number from 1 to {MAX_BURST}"))
    return violations


def _encode_token(after_id: str, tenant: str | None) -> str:
    payload = json.dumps([after_id, tenant], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode()


def _decode_token(token: str, tenant: str | None) -> str:
    """The id the page starts after; the token must come from a listing of the same tenant."""
    try:
        payload = json.loads(base64.b64decode(token.encode(), altchars=b"-_", validate=True))
    except (binascii.Error, UnicodeDecodeError, ValueError) as error:
        raise InvalidArgument.for_field("page_token", "is not a token this service issued") from error
    match payload:
        case [str() as after_id, (str() | None) as token_tenant] if after_id:
            if token_tenant != tenant:
                raise InvalidArgument.for_field("page_token", "was issued for another tenant filter")
            return after_id
    raise InvalidArgument.for_field("page_token", "is not a token this service issued")


# the store

_KEY_COLUMNS = """id, tenant, scopes, description, created_by, create_time, revoke_time,
    last_used_time, rate_per_second, burst"""


def _api_key(row: asyncpg.Record) -> ApiKey:
    per_second, burst = row["rate_per_second"], row["burst"]
    return ApiKey(
        id=row["id"],
        tenant=row["tenant"],
        # a scope this version does not know (written by a newer one) grants nothing here
        scopes=frozenset(Scope(s) for s in row["scopes"] if s in _SCOPE_NAMES),
        description=row["description"],
        created_by=row["created_by"],
        create_time=row["create_time"],
        revoke_time=row["revoke_time"],
        last_used_time=row["last_used_time"],
        rate=RateLimit(per_second, burst) if per_second is not None else None,
    )


def _invalid_key() -> Unauthenticated:
    # one message for an unknown id and a wrong secret: the answer must not tell someone
    # probing ids which ones exist
    return Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")


@dataclass(slots=True)
class _Cached:
    key: ApiKey
    hash: bytes
    expires: float


class KeyStore:
    """API keys and usage counters in PostgreSQL.

    :meth:`authenticate` keeps keys it found valid for ``cache_ttl_s`` (``clock`` measures it;
    substitute one in tests), so that a busy key costs one query per TTL rather than one per
    request. :meth:`revoke` drops the key from this process's cache at once; other gateway
    processes notice within ``cache_ttl_s``. Failed lookups are not cached.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        cache_ttl_s: float = CACHE_TTL_S,
        cache_max_keys: int = CACHE_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._ttl = cache_ttl_s
        self._cache_max = cache_max_keys
        self._clock = clock
        # insertion-ordered, so the first entry is the oldest to evict
        self._cache: dict[str, _Cached] = {}

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        cache_ttl_s: float = CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> KeyStore:
        """Connects and applies pending migrations (safe with several replicas starting at once)."""
        pool = await migrated_pool(
            dsn,
            component="gateway",
            package="services.gateway.migrations",
            min_size=min_size,
            max_size=max_size,
        )
        return cls(pool, cache_ttl_s=cache_ttl_s, clock=clock)

    async def close(self) -> None:
        await self._pool.close()

    # keys

    async def create(
        self,
        tenant: str,
        scopes: Iterable[str],
        *,
        description: str = "",
        created_by: str,
        rate: RateLimit | None = None,
    ) -> tuple[ApiKey, str]:
        """Creates a key for ``tenant`` with ``scopes`` (names such as ``models:read``) and
        returns it with its plaintext, which exists nowhere else afterwards: show it once.
        INVALID_ARGUMENT names the bad fields (``tenant``, ``scopes``, ``description``,
        ``created_by``, ``rate.requests_per_second``, ``rate.burst``)."""
        parsed, violations = parse_scopes(scopes)
        violations += _check_new_key(tenant, description, created_by, rate)
        raise_for_violations(violations)
        while True:
            key_id, plaintext = new_key()
            async with translated_errors():
                row = await self._pool.fetchrow(
                    f"""INSERT INTO api_keys
                            (id, tenant, scopes, hash, description, created_by, rate_per_second, burst)
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                        ON CONFLICT (id) DO NOTHING
                        RETURNING {_KEY_COLUMNS}""",
                    key_id,
                    tenant,
                    sorted(s.value for s in parsed),
                    _hash(plaintext),
                    description,
                    created_by,
                    rate.requests_per_second if rate else None,
                    rate.burst if rate else None,
                )
            # 48 random bits of id: a clash is rare but must not reuse someone's id
            if row is not None:
                return _api_key(row), plaintext
            log.info("API key id %s is taken; drawing another", key_id)

    async def get(self, key_id: str) -> ApiKey:
        """The key ``key_id`` (revoked or not); NOT_FOUND when there is none."""
        async with translated_errors():
            row = await self._pool.fetchrow(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = $1", key_id)
        if row is None:
            raise _key_not_found(key_id)
        return _api_key(row)

    async def list(
        self,
        tenant: str | None = None,
        *,
        include_revoked: bool = True,
        page_size: int = 0,
        page_token: str = "",
    ) -> KeyPage:
        """Keys of ``tenant`` (None: of every tenant) in id order; ``page_size`` 0 means 100,
        at most 1000. A page token works only with the tenant filter it was issued for."""
        limit = paging.page_size(page_size)
        after = _decode_token(page_token, tenant) if page_token else ""
        async with translated_errors():
            rows = await self._pool.fetch(
                f"""SELECT {_KEY_COLUMNS} FROM api_keys
                    WHERE ($1::text IS NULL OR tenant = $1) AND id > $2
                      AND ($3 OR revoke_time IS NULL)
                    ORDER BY id LIMIT $4""",
                tenant,
                after,
                include_revoked,
                limit + 1,
            )
        keys = tuple(_api_key(row) for row in rows[:limit])
        token = _encode_token(keys[-1].id, tenant) if len(rows) > limit else ""
        return KeyPage(keys, token)

    async def revoke(self, key_id: str) -> ApiKey:
        """Revokes ``key_id`` and returns it; revoking a revoked key keeps its first
        revoke_time. NOT_FOUND when there is no such key. Other gateway processes may accept
        the key for up to their cache TTL."""
        async with translated_errors():
            row = await self._pool.fetchrow(
                f"""UPDATE api_keys SET revoke_time = coalesce(revoke_time, now()) WHERE id = $1
                    RETURNING {_KEY_COLUMNS}""",
                key_id,
            )
        self._cache.pop(key_id, None)
        if row is None:
            raise _key_not_found(key_id)
        return _api_key(row)

    async def authenticate(self, plaintext: str) -> ApiKey:
        """The key whose plaintext this is. Unauthenticated with reason API_KEY_MALFORMED (not
        ``smk_<id>_<secret>``), API_KEY_INVALID (unknown id or wrong secret, told apart by
        nobody) or API_KEY_REVOKED (said only once the secret matched: it helps the holder
        and tells a guesser nothing)."""
        key_id = key_id_of(plaintext)
        digest = _hash(plaintext)
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached is not None and cached.expires > now:
            if hmac.compare_digest(cached.hash, digest):
                return cached.key
            raise _invalid_key()
        async with translated_errors():
            row = await self._pool.fetchrow(
                f"SELECT {_KEY_COLUMNS}, hash FROM api_keys WHERE id = $1", key_id
            )
        if row is None or not hmac.compare_digest(bytes(row["hash"]), digest):
            raise _invalid_key()
        key = _api_key(row)
        if key.revoked:
            self._cache.pop(key_id, None)
            raise Unauthenticated(
                f"API key {key_id} was revoked", reason="API_KEY_REVOKED", metadata={"key_id": key_id}
            )
        self._remember(key, digest, now)
        await self._touch(key_id)
        return key

    def _remember(self, key: ApiKey, digest: bytes, now: float) -> None:
        self._cache.pop(key.id, None)
        while len(self._cache) >= self._cache_max:
            del self._cache[next(iter(self._cache))]
        self._cache[key.id] = _Cached(key, digest, now + self._ttl)

    async def _touch(self, key_id: str) -> None:
        # a hint, not worth failing a request for: the key was valid a moment ago
        try:
            await self._pool.execute(
                f"""UPDATE api_keys SET last_used_time = now()
                    WHERE id = $1 AND (last_used_time IS NULL
                                       OR last_used_time < now() - interval '{_LAST_USED_PRECISION}')""",
                key_id,
            )
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as error:
            log.warning("could not record the use of API key %s: %s", key_id, error)

    # usage

    async def add_usage(self, increments: Sequence[UsageRow]) -> None:
        """Adds ``increments`` to the usage rows in one transaction. Raises asyncpg's errors
        untranslated: only the usage recorder calls this, and it retries."""
        # one order for every writer: two gateways upserting the same rows in different
        # orders could deadlock
        ordered = sorted(increments, key=lambda i: (i.key_id, i.model, i.bucket))
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                """INSERT INTO usage (key_id, tenant, model, bucket, requests, rows)
                   VALUES ($1, $2, $3, $4, $5, $6)
                   ON CONFLICT (key_id, model, bucket) DO UPDATE
                   SET requests = usage.requests + EXCLUDED.requests,
                       rows = usage.rows + EXCLUDED.rows""",
                [(i.key_id, i.tenant, i.model, i.bucket, i.requests, i.rows) for i in ordered],
            )

    async def read_usage(
        self,
        *,
        key_id: str | None = None,
        tenant: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        hourly: bool = True,
    ) -> builtins.list[UsageRow]:
        """Usage rows of ``key_id``, ``tenant`` and ``model`` (None: any) of the hours from
        the one holding ``since`` (None: the first) to those starting before ``until`` (None:
        now). ``hourly``: one row per hour, oldest first, then by key and model; else one per
        key and model summed over those hours (``bucket`` is the first hour counted)."""
        filters = """($1::text IS NULL OR key_id = $1) AND ($2::text IS NULL OR tenant = $2)
                     AND ($3::text IS NULL OR model = $3)
                     AND ($4::timestamptz IS NULL OR bucket > $4 - interval '1 hour')
                     AND ($5::timestamptz IS NULL OR bucket < $5)"""
        if hourly:
            query = f"""SELECT key_id, tenant, model, bucket, requests, rows FROM usage
                        WHERE {filters} ORDER BY bucket, key_id, model"""
        else:
            query = f"""SELECT key_id, tenant, model, min(bucket) AS bucket,
                               sum(requests)::bigint AS requests, sum(rows)::bigint AS rows
                        FROM usage WHERE {filters}
                        GROUP BY key_id, tenant, model ORDER BY key_id, model"""
        async with translated_errors():
            rows = await self._pool.fetch(query, key_id, tenant, model, since, until)
        return [
            UsageRow(r["key_id"], r["tenant"], r["model"], r["bucket"], r["requests"], r["rows"])
            for r in rows
        ]


def _key_not_found(key_id: str) -> NotFound:
    return NotFound(f"no API key {key_id!r}", reason="API_KEY_NOT_FOUND", metadata={"key_id": key_id})


# the first start


async def ensure_admin_key(home: Path, store: KeyStore) -> str | None:
    """Makes sure ``home/admin.key`` holds a valid admin key, and returns the plaintext of a
    key created now (for ``scoremesh up`` to print), or None when the file's key still works.

    A new key (tenant ``default``, every scope) replaces a missing file, or one whose key was
    revoked, lost its admin scope or is unknown to this database (a reset database). The file
    is written with mode 0600 under a temporary name and renamed into place, so it is never
    seen half written or readable by others.
    """
    path = home / ADMIN_KEY_FILE
    try:
        existing = (await asyncio.to_thread(path.read_text)).strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        try:
            key = await store.authenticate(existing)
        except Unauthenticated as error:
            log.warning("%s holds a key that no longer works (%s): creating another", path, error.reason)
        else:
            if Scope.ADMIN in key.scopes:
                return None
            log.warning("%s holds key %s, which lacks the admin scope: creating another", path, key.id)
    key, plaintext = await store.create(
        DEFAULT_TENANT,
        [s.value for s in Scope],
        description="the admin key scoremesh up created on first start",
        created_by="scoremesh up",
    )
    await asyncio.to_thread(_write_private, path, plaintext + "\n")
    log.info("created admin key %s and wrote it to %s", key.id, path)
    return plaintext


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never write into a file (or through a link) that someone else put there
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            # the mode given to open is reduced by the umask; this one must be exactly 0600
            os.fchmod(out.fileno(), 0o600)
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
