"""Durable records in PostgreSQL (``storage.backend = "postgresql"``): the same
``signaling.store.RecordStore`` as the SQLite file, for several `serve` processes sharing one
database (a fleet), on an asyncpg connection pool.

The same guarantees as SQLite:
- a write is committed before its call returns. Every connection sets ``synchronous_commit =
  on`` (a server-wide ``off`` would otherwise let an acknowledged request vanish in a crash of
  the database server); with synchronous standbys configured, COMMIT also waits for them.
- a claim is one statement (atomic as any statement, its own transaction): a conditional
  UPDATE (``status = 'waiting'``) and, in a data-modifying WITH, the INSERT of the consultation
  from the row it returned. Under READ COMMITTED a second claimant's UPDATE waits on the first
  one's row lock, then re-reads the row, finds it no longer waiting and changes nothing, so its
  INSERT inserts nothing: exactly one process wins; the others get AlreadyTaken.
  ``finish_request``, ``mark_escalated`` and ``end_consultation`` (one statement too) are
  conditional the same way. One statement is one round trip to the server, where BEGIN,
  UPDATE, INSERT, COMMIT were four.
- the schema is ``signaling.migrations``'s steps, applied at open under an advisory lock (nodes
  starting together apply each step once).

Every wait is bounded: taking a connection from the pool and every statement time out after
``timeout_s`` (an unreachable database fails the call instead of hanging the client's ack).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from config.settings import ConfigError
from signaling.directory import Directory
from signaling.errors import AlreadyTaken, InvalidState, NotFound
from signaling.migrations import migrate_postgresql, postgresql_version
from signaling.models import (
    ChatMessage,
    Clinician,
    Consultation,
    ConsultRequest,
    Minutes,
    Site,
)
from signaling.store import (
    ALREADY_TAKEN,
    CONSULTATION_COLUMNS,
    REQUEST_COLUMNS,
    consultation_from_row,
    request_from_row,
)

logger = logging.getLogger(__name__)

TIMEOUT_S = 30.0
"""Default bound on taking a connection and on each statement."""
SEED_LOCK = 0x7E1E_4EA1_0000_0015
"""Advisory lock key held while an empty database's directory is seeded (nodes starting
together seed it once)."""
SERVER_SETTINGS = {"application_name": "telehealth", "synchronous_commit": "on"}
OPEN_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
"""What opening the records may meet: the server unreachable, refusing the user or the
database, or the user not allowed to create the tables."""


def cannot_open(dsn: str, exc: BaseException) -> ConfigError:
    """Start-up's error for records that cannot be opened: it names the setting, and the
    CLI prints it and exits 2 (as for any other configuration problem)."""
    return ConfigError(f"storage.postgresql_dsn = {redacted(dsn)!r}: cannot open the records "
                       f"there: {type(exc).__name__}: {exc}")


def redacted(dsn: str) -> str:
    """The DSN without its password, for logs and errors."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


async def keep_session(conn: Any) -> None:
    """The pool's reset of a connection given back: nothing more than asyncpg's own (an
    open transaction rolled back, listeners dropped). asyncpg's default also runs ``SELECT
    pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` each time, one more round
    trip per store call, as much busy time on a fleet's node as all of the store's queries
    (py-spy, ``bench/signaling_load.py --nodes 2``). Nothing here leaves such session state:
    the server settings are the connection's startup parameters (``RESET ALL`` goes back to
    them anyway), every advisory lock is ``pg_advisory_xact_lock`` (released at commit), and
    there are no LISTEN, SET or cursors outside a transaction. A caller that adds session
    state must undo it itself, or bring back the default reset."""


async def open_pool(dsn: str, *, min_size: int, max_size: int, timeout_s: float,
                    migrate: Callable[[Any], Awaitable[object]],
                    version: Callable[[Any], Awaitable[int]]) -> tuple[Any, int]:
    """An asyncpg pool at ``dsn`` whose schema ``migrate`` brought up to date, and the schema
    step it is at (the records and the accounts each open their own). A server that cannot
    be reached, or a schema that cannot be made, is ``cannot_open``'s configuration error."""
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, command_timeout=timeout_s,
            timeout=timeout_s, server_settings=SERVER_SETTINGS, reset=keep_session)
    except OPEN_ERRORS as exc:
        raise cannot_open(dsn, exc) from exc
    try:
        async with pool.acquire(timeout=timeout_s) as conn:
            await migrate(conn)
            return pool, await version(conn)
    except BaseException as exc:
        pool.terminate()
        if isinstance(exc, OPEN_ERRORS):
            raise cannot_open(dsn, exc) from exc
        raise


async def close_pool(pool: Any, timeout_s: float, what: str) -> None:
    """Close ``pool``, waiting at most ``timeout_s`` for its connections to be given back."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        logger.warning("%s: PostgreSQL connections still busy after %.0f s; closed by force",
                       what, timeout_s)
        pool.terminate()


CLAIM = f"""
WITH claimed AS (
    UPDATE requests SET status = 'accepted', accepted_by = $1, accepted_at = $2,
        consultation_id = $3
    WHERE id = $4 AND status = 'waiting' RETURNING id
), created AS (
    INSERT INTO consultations ({CONSULTATION_COLUMNS})
    SELECT $3, id, $5::text, $6::text, $7::text, $8::double precision,
        $9::double precision, $10::double precision, $11::jsonb, $12::jsonb, $13::jsonb,
        NULL, NULL, NULL
    FROM claimed RETURNING 1
)
SELECT (SELECT count(*) FROM created), (SELECT status FROM requests WHERE id = $4)
"""
"""``claim`` in one statement: 1 and the request's status when it won, else 0 and its status
as of the statement's start (``waiting`` when another claim committed while this one waited
for the row's lock)."""

END = """
WITH ended AS (
    UPDATE consultations SET state = 'ended', ended_at = $1, conclusion = $2, signed_by = $3,
        signed_at = $1
    WHERE id = $4 AND state != 'ended' RETURNING id
), closed AS (
    UPDATE requests SET status = 'closed', closed_at = $1
    WHERE id = $5 AND EXISTS (SELECT 1 FROM ended)
), departed AS (
    UPDATE attendance SET left_at = $1
    WHERE consultation_id = $4 AND left_at IS NULL AND EXISTS (SELECT 1 FROM ended)
)
SELECT count(*) FROM ended
"""
"""``end_consultation`` in one statement: the minutes, the request closed and the attendance
ended only if this statement ended the consultation (1), else nothing is written (0)."""


DIRECTORY_DIGEST = """
SELECT (SELECT md5(string_agg(t::text, ',' ORDER BY t.id COLLATE "C")) FROM sites t),
       (SELECT md5(string_agg(t::text, ',' ORDER BY t.id COLLATE "C")) FROM clinicians t),
       (SELECT md5(string_agg(t::text, ',' ORDER BY t.id COLLATE "C")) FROM regions t)
"""
"""A digest of every row of the directory's tables, computed by the server: any change to
any column of any row (or a row added or removed) changes it."""


class PostgresRecordStore:
    """The records in the PostgreSQL database at ``dsn`` (``RecordStore``), through at most
    ``pool_size`` connections. Open with ``await open()``, close with ``await close()``
    (idempotent)."""

    def __init__(self, dsn: str, pool_size: int = 10, *, timeout_s: float = TIMEOUT_S) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.timeout_s = timeout_s
        self._pool: Any = None
        self._closed = False
        self._directory: tuple[tuple[str | None, ...], Directory] | None = None
        """The last directory read, with its digest (``DIRECTORY_DIGEST``)."""

    async def open(self) -> None:
        self._pool, version = await open_pool(
            self.dsn, min_size=min(2, self.pool_size), max_size=self.pool_size,
            timeout_s=self.timeout_s, migrate=migrate_postgresql, version=postgresql_version)
        logger.info("records in PostgreSQL %s (schema step %d, %d connections at most)",
                    redacted(self.dsn), version, self.pool_size)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await close_pool(pool, self.timeout_s, "records")

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        if self._pool is None:
            raise RuntimeError(f"records store {redacted(self.dsn)} is closed")
        async with self._pool.acquire(timeout=self.timeout_s) as conn:
            yield conn

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        async with self._connection() as conn, conn.transaction():
            yield conn

    # -- directory ------------------------------------------------------------------------
    async def save_directory(self, sites: Iterable[Site] = (),
                             clinicians: Iterable[Clinician] = (),
                             regions: Mapping[str, str] | None = None) -> None:
        """Insert or replace these records in one transaction: all of them or none."""
        site_list, clinician_list = list(sites), list(clinicians)
        async with self._transaction() as conn:
            await write_directory(conn, site_list, clinician_list, regions or {})

    async def read_directory(self) -> Directory:
        """The directory as stored. While the tables' digest is the one of the last read,
        that read's ``Directory`` is returned again, the same object (callers only read
        it): a fleet's node reads the directory every ``fleet.RESYNC_S``, and turning 4,000
        sites and their clinicians into a ``Directory`` held its event loop for 100-500 ms
        each time on the bench's machine (pairings of those moments waited as long), where
        the digest is one query the server answers in 15-25 ms without the node's loop. The
        digest is read before the rows: a write between the two leaves a newer directory
        under an older digest, which only makes the next call read it again."""
        async with self._connection() as conn:
            digest = tuple(await conn.fetchrow(DIRECTORY_DIGEST))
            last = self._directory
            if last is not None and last[0] == digest:
                return last[1]
            directory = await read_directory(conn)
        self._directory = (digest, directory)
        return directory

    # -- requests -------------------------------------------------------------------------
    async def add_request(self, request: ConsultRequest) -> None:
        async with self._connection() as conn:
            await conn.execute(
                f"INSERT INTO requests ({REQUEST_COLUMNS}) VALUES "
                "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                request.id, request.site_id, request.requester_id, request.specialty,
                request.priority, request.reason, request.patient_pseudonym, request.status,
                request.created_at, request.escalated_at, request.accepted_by,
                request.accepted_at, request.consultation_id, request.closed_at)

    async def get_request(self, request_id: str) -> ConsultRequest | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {REQUEST_COLUMNS} FROM requests WHERE id = $1", request_id)
        return request_from_row(tuple(row)) if row else None

    async def waiting_requests(self) -> list[ConsultRequest]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {REQUEST_COLUMNS} FROM requests WHERE status = 'waiting' "
                "ORDER BY created_at, id")
        return [request_from_row(tuple(r)) for r in rows]

    async def requests_of(self, requester_id: str, limit: int = 50) -> list[ConsultRequest]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {REQUEST_COLUMNS} FROM requests WHERE requester_id = $1 "
                "ORDER BY created_at DESC LIMIT $2", requester_id, limit)
        return [request_from_row(tuple(r)) for r in rows]

    async def finish_request(self, request_id: str, status: str, at: float) -> bool:
        """Move a waiting request to ``cancelled`` or ``expired``; False if it was not waiting."""
        async with self._connection() as conn:
            result = await conn.execute(
                "UPDATE requests SET status = $1, closed_at = $2 "
                "WHERE id = $3 AND status = 'waiting'", status, at, request_id)
        return _count(result) == 1

    async def mark_escalated(self, request_id: str, at: float) -> bool:
        async with self._connection() as conn:
            result = await conn.execute(
                "UPDATE requests SET escalated_at = $1 WHERE id = $2 AND escalated_at IS NULL",
                at, request_id)
        return _count(result) == 1

    async def claim(self, request_id: str, clinician_id: str, consultation: Consultation,
                    at: float) -> None:
        """Atomically accept a waiting request and create its consultation.

        Raises AlreadyTaken if someone else accepted it first, InvalidState if it is no longer
        waiting for another reason, NotFound if there is no such request.
        """
        c = consultation
        async with self._connection() as conn:
            row = await conn.fetchrow(CLAIM, clinician_id, at, c.id, request_id, c.host_id,
                                      c.relay_id, c.state, c.created_at, c.started_at,
                                      c.ended_at, json.dumps(c.site_ids),
                                      json.dumps(c.clinician_ids),
                                      json.dumps(c.invited_site_ids))
            if row[0] == 1:
                return
            status = row[1]
            if status == "waiting":
                # Claimed by another while this statement waited for the row: the statement's
                # snapshot predates that claim; read it again.
                status = await conn.fetchval(
                    "SELECT status FROM requests WHERE id = $1", request_id)
        if status is None:
            raise NotFound(f"no consult request {request_id!r}")
        if status in ("accepted", "closed"):
            raise AlreadyTaken(ALREADY_TAKEN.format(request_id))
        raise InvalidState(f"consult request {request_id!r} is {status}")

    # -- consultations ---------------------------------------------------------------------
    async def get_consultation(self, consultation_id: str) -> Consultation | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {CONSULTATION_COLUMNS} FROM consultations WHERE id = $1",
                consultation_id)
        return consultation_from_row(tuple(row)) if row else None

    async def active_consultations(self) -> list[Consultation]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {CONSULTATION_COLUMNS} FROM consultations WHERE state != 'ended'")
        return [consultation_from_row(tuple(r)) for r in rows]

    async def consultations_for(self, clinician_id: str, site_id: str, *, everything: bool,
                                limit: int = 100) -> list[Consultation]:
        """Consultations the clinician is named on or whose sites were invited (all of them
        when ``everything``), newest first."""
        async with self._connection() as conn:
            if everything:
                rows = await conn.fetch(
                    f"SELECT {CONSULTATION_COLUMNS} FROM consultations "
                    "ORDER BY created_at DESC LIMIT $1", limit)
            else:
                # jsonb ? text: the string is an element of the array (GIN-indexed, step 2).
                rows = await conn.fetch(
                    f"SELECT {CONSULTATION_COLUMNS} FROM consultations "
                    "WHERE clinician_ids ? $1 OR invited_site_ids ? $2 "
                    "ORDER BY created_at DESC LIMIT $3", clinician_id, site_id, limit)
        return [consultation_from_row(tuple(r)) for r in rows]

    async def save_consultation(self, consultation: Consultation) -> None:
        c = consultation
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE consultations SET state = $1, started_at = $2, ended_at = $3, "
                "site_ids = $4, clinician_ids = $5, invited_site_ids = $6, relay_id = $7 "
                "WHERE id = $8 AND state != 'ended'",
                c.state, c.started_at, c.ended_at, json.dumps(c.site_ids),
                json.dumps(c.clinician_ids), json.dumps(c.invited_site_ids), c.relay_id, c.id)

    async def end_consultation(self, consultation: Consultation, minutes: Minutes) -> None:
        """Store the minutes, end the consultation and close its request, in one transaction."""
        async with self._connection() as conn:
            ended = await conn.fetchval(END, minutes.signed_at, minutes.conclusion,
                                        minutes.signed_by, consultation.id,
                                        consultation.request_id)
        if ended != 1:
            raise InvalidState(f"consultation {consultation.id!r} has already ended")

    # -- chat and attendance ---------------------------------------------------------------
    async def add_chat(self, message: ChatMessage) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO chat (id, consultation_id, sender_id, site_id, text, sent_at) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                message.id, message.consultation_id, message.sender_id, message.site_id,
                message.text, message.sent_at)

    async def chat_of(self, consultation_id: str) -> list[ChatMessage]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, consultation_id, sender_id, site_id, text, sent_at FROM chat "
                'WHERE consultation_id = $1 ORDER BY sent_at, id COLLATE "C"', consultation_id)
        return [ChatMessage(*r) for r in rows]

    async def record_join(self, consultation_id: str, clinician_id: str, site_id: str,
                          at: float) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO attendance (consultation_id, clinician_id, site_id, joined_at) "
                "VALUES ($1, $2, $3, $4)", consultation_id, clinician_id, site_id, at)

    async def record_leave(self, consultation_id: str, clinician_id: str, at: float) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE attendance SET left_at = $1 WHERE consultation_id = $2 "
                "AND clinician_id = $3 AND left_at IS NULL", at, consultation_id, clinician_id)

    async def attendance_of(self, consultation_id: str) -> list[dict[str, Any]]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT clinician_id, site_id, joined_at, left_at FROM attendance "
                "WHERE consultation_id = $1 ORDER BY joined_at", consultation_id)
        return [{"clinician_id": r[0], "site_id": r[1], "joined_at": r[2], "left_at": r[3]}
                for r in rows]

    async def attendees_of(self, consultation_id: str) -> frozenset[str]:
        """The clinicians who joined the consultation at least once."""
        return frozenset(a["clinician_id"] for a in await self.attendance_of(consultation_id))


def _count(status: str) -> int:
    """The row count of a command status such as ``UPDATE 1``."""
    return int(status.rsplit(" ", 1)[-1])


async def write_directory(conn: Any, sites: list[Site], clinicians: list[Clinician],
                          regions: Mapping[str, str]) -> None:
    """Insert or replace (the caller's transaction makes it all or nothing)."""
    if sites:
        await conn.executemany(
            "INSERT INTO sites (id, name, tier, region, active, updated_at) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET "
            "name = excluded.name, tier = excluded.tier, region = excluded.region, "
            "active = excluded.active, updated_at = excluded.updated_at",
            [(s.id, s.name, s.tier, s.region, s.active, s.updated_at) for s in sites])
    if clinicians:
        await conn.executemany(
            "INSERT INTO clinicians (id, name, site_id, roles, specialties, active, updated_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET "
            "name = excluded.name, site_id = excluded.site_id, roles = excluded.roles, "
            "specialties = excluded.specialties, active = excluded.active, "
            "updated_at = excluded.updated_at",
            [(c.id, c.name, c.site_id, json.dumps(sorted(c.roles)),
              json.dumps(sorted(c.specialties)), c.active, c.updated_at) for c in clinicians])
    if regions:
        await conn.executemany(
            "INSERT INTO regions (id, name) VALUES ($1, $2) "
            "ON CONFLICT (id) DO UPDATE SET name = excluded.name", sorted(regions.items()))


async def read_directory(conn: Any) -> Directory:
    """The directory's three tables from one snapshot: read statement by statement, a node
    starting while another seeded the directory read no sites and then its clinicians, and
    exited ("clinician 'admin' names site 'c1', which is not in the directory")."""
    if conn.is_in_transaction():
        return await _read_directory(conn)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _read_directory(conn)


async def _read_directory(conn: Any) -> Directory:
    # COLLATE "C": the same order as SQLite's, whatever the database's locale.
    sites = [Site(r[0], r[1], r[2], r[3], r[4], r[5]) for r in await conn.fetch(
        'SELECT id, name, tier, region, active, updated_at FROM sites ORDER BY id COLLATE "C"')]
    clinicians = [
        Clinician(r[0], r[1], r[2], frozenset(json.loads(r[3])), frozenset(json.loads(r[4])),
                  r[5], r[6])
        for r in await conn.fetch(
            "SELECT id, name, site_id, roles, specialties, active, updated_at FROM clinicians "
            'ORDER BY id COLLATE "C"')]
    regions = {r[0]: r[1] for r in await conn.fetch("SELECT id, name FROM regions")}
    return Directory(sites, clinicians, regions)


def open_directory(dsn: str, seed: Callable[[], tuple[Directory, str]],
                   timeout_s: float = TIMEOUT_S) -> Directory:
    """The directory in the database at ``dsn`` (its schema brought up to date first); when
    it has none yet, ``seed()`` gives one (and says where from) and it is written first, once
    however many nodes start together. Synchronous, as SQLite's ``open_directory``: start-up
    and the CLI call it before the app exists, sometimes inside a running event loop, so it
    runs on a loop of its own in a thread of its own, on one connection of its own."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="records-directory") as thread:
        future = thread.submit(asyncio.run, _open_directory(dsn, seed, timeout_s))
        return future.result(timeout=4 * timeout_s)


async def _open_directory(dsn: str, seed: Callable[[], tuple[Directory, str]],
                          timeout_s: float) -> Directory:
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout_s, command_timeout=timeout_s,
                                     server_settings=SERVER_SETTINGS)
    except OPEN_ERRORS as exc:
        raise cannot_open(dsn, exc) from exc
    try:
        try:
            await migrate_postgresql(conn)
        except OPEN_ERRORS as exc:
            raise cannot_open(dsn, exc) from exc
        directory = await read_directory(conn)
        if directory.all_sites:
            logger.info("directory: %d sites, %d clinicians (%d active) from PostgreSQL %s",
                        len(directory.all_sites), len(directory.all_clinicians),
                        len(directory.clinicians), redacted(dsn))
            return directory
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SEED_LOCK)
            directory = await read_directory(conn)
            if directory.all_sites:  # another node seeded it while we waited for the lock
                return directory
            directory, source = seed()
            await write_directory(conn, list(directory.all_sites.values()),
                                  list(directory.all_clinicians.values()), directory.regions)
        logger.info("directory: PostgreSQL %s was empty; seeded with %d sites and %d "
                    "clinicians from %s (from now on the store is the directory: change it "
                    "with the admin API or `telehealth directory import`)", redacted(dsn),
                    len(directory.all_sites), len(directory.all_clinicians), source)
        return directory
    finally:
        await asyncio.wait_for(conn.close(), timeout_s)
