"""Durable records: the directory (its source of truth), consult requests, consultations,
minutes, chat and attendance. ``RecordStore`` is what the services use; two backends answer it
with the same guarantees (``storage.backend``):

- ``SqliteRecordStore`` (here): a file in the data directory, for one `serve` process. Every
  write is committed (WAL, synchronous=FULL) before the call returns, so an acknowledged
  request survives a kill -9 of the server. All database work runs on one dedicated thread:
  the event loop never blocks on disk, and writes of this process are serialized.
- ``signaling.store_pg.PostgresRecordStore``: a PostgreSQL database several `serve` processes
  share (a fleet).

Either way a claim (accept) is a conditional UPDATE inside one write transaction, so exactly one
claimant wins even across processes, and the schema is ``signaling.migrations``'s steps,
applied at open.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from signaling.directory import Directory
from signaling.errors import AlreadyTaken, InvalidState, NotFound
from signaling.migrations import migrate_sqlite
from signaling.models import (
    ChatMessage,
    Clinician,
    Consultation,
    ConsultRequest,
    Minutes,
    Site,
)
from signaling.sqlite import SqliteFile, connect, transaction

logger = logging.getLogger(__name__)

T = TypeVar("T")

REQUEST_COLUMNS = (
    "id, site_id, requester_id, specialty, priority, reason, patient_pseudonym, status, "
    "created_at, escalated_at, accepted_by, accepted_at, consultation_id, closed_at"
)
CONSULTATION_COLUMNS = (
    "id, request_id, host_id, relay_id, state, created_at, started_at, ended_at, site_ids, "
    "clinician_ids, invited_site_ids, conclusion, signed_by, signed_at"
)


ALREADY_TAKEN = "consult request {!r} was already taken by another specialist"


def request_from_row(row: tuple[Any, ...]) -> ConsultRequest:
    return ConsultRequest(*row)


def consultation_from_row(row: tuple[Any, ...]) -> Consultation:
    (cid, request_id, host_id, relay_id, state, created_at, started_at, ended_at, site_ids,
     clinician_ids, invited, conclusion, signed_by, signed_at) = row
    minutes = Minutes(conclusion, signed_by, signed_at) if conclusion is not None else None
    return Consultation(
        id=cid, request_id=request_id, host_id=host_id, relay_id=relay_id, state=state,
        created_at=created_at, site_ids=json.loads(site_ids),
        clinician_ids=json.loads(clinician_ids), invited_site_ids=json.loads(invited),
        started_at=started_at, ended_at=ended_at, minutes=minutes,
    )


class RecordStore(Protocol):
    """The durable records, whatever holds them. Open with ``await open()`` (the schema is
    brought up to date), close with ``await close()`` (idempotent). Every write is durable
    when its call returns."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def save_directory(self, sites: Iterable[Site] = (),
                             clinicians: Iterable[Clinician] = (),
                             regions: Mapping[str, str] | None = None) -> None:
        """Insert or replace these records in one transaction: all of them or none."""
        ...

    async def read_directory(self) -> Directory: ...

    async def add_request(self, request: ConsultRequest) -> None: ...

    async def get_request(self, request_id: str) -> ConsultRequest | None: ...

    async def waiting_requests(self) -> list[ConsultRequest]: ...

    async def requests_of(self, requester_id: str, limit: int = 50) -> list[ConsultRequest]:
        """The requester's requests, newest first."""
        ...

    async def finish_request(self, request_id: str, status: str, at: float) -> bool:
        """Move a waiting request to ``cancelled`` or ``expired``; False if it was not waiting."""
        ...

    async def mark_escalated(self, request_id: str, at: float) -> bool:
        """Note that the request escalated at ``at``. True only for the one call that did it:
        False when it had escalated already (another node's timer, say) or does not exist."""
        ...

    async def claim(self, request_id: str, clinician_id: str, consultation: Consultation,
                    at: float) -> None:
        """Atomically accept a waiting request and create its consultation.

        Raises AlreadyTaken if someone else accepted it first, InvalidState if it is no longer
        waiting for another reason, NotFound if there is no such request.
        """
        ...

    async def get_consultation(self, consultation_id: str) -> Consultation | None: ...

    async def active_consultations(self) -> list[Consultation]: ...

    async def consultations_for(self, clinician_id: str, site_id: str, *, everything: bool,
                                limit: int = 100) -> list[Consultation]:
        """Consultations the clinician is named on or whose sites were invited (all of them
        when ``everything``), newest first."""
        ...

    async def save_consultation(self, consultation: Consultation) -> None:
        """Write its state, times, sites, clinicians and relay; never over an ended one
        (only ``end_consultation`` ends it: a process holding an older copy, another node of
        a fleet, cannot bring it back)."""
        ...

    async def end_consultation(self, consultation: Consultation, minutes: Minutes) -> None:
        """Store the minutes, end the consultation and close its request, in one transaction;
        InvalidState if it had ended already."""
        ...

    async def add_chat(self, message: ChatMessage) -> None: ...

    async def chat_of(self, consultation_id: str) -> list[ChatMessage]: ...

    async def record_join(self, consultation_id: str, clinician_id: str, site_id: str,
                          at: float) -> None: ...

    async def record_leave(self, consultation_id: str, clinician_id: str, at: float) -> None: ...

    async def attendance_of(self, consultation_id: str) -> list[dict[str, Any]]: ...

    async def attendees_of(self, consultation_id: str) -> frozenset[str]:
        """The clinicians who joined the consultation at least once."""
        ...


class SqliteRecordStore(SqliteFile):
    """The SQLite file under the data directory (``RecordStore``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, name="records", synchronous="FULL")

    def _prepare(self, db: sqlite3.Connection) -> None:
        _prepare(db)

    # -- directory ------------------------------------------------------------------------
    async def save_directory(self, sites: Iterable[Site] = (),
                             clinicians: Iterable[Clinician] = (),
                             regions: Mapping[str, str] | None = None) -> None:
        """Insert or replace these records in one transaction: all of them or none."""
        site_list, clinician_list = list(sites), list(clinicians)

        def _write(db: sqlite3.Connection) -> None:
            write_directory(db, site_list, clinician_list, regions or {})

        await self._run(_write)

    async def read_directory(self) -> Directory:
        return await self._run(read_directory)

    # -- requests -------------------------------------------------------------------------
    async def add_request(self, request: ConsultRequest) -> None:
        def _write(db: sqlite3.Connection) -> None:
            with transaction(db):
                db.execute(
                    f"INSERT INTO requests ({REQUEST_COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (request.id, request.site_id, request.requester_id, request.specialty,
                     request.priority, request.reason, request.patient_pseudonym,
                     request.status, request.created_at, request.escalated_at,
                     request.accepted_by, request.accepted_at, request.consultation_id,
                     request.closed_at),
                )

        await self._run(_write)

    async def get_request(self, request_id: str) -> ConsultRequest | None:
        def _read(db: sqlite3.Connection) -> ConsultRequest | None:
            row = db.execute(
                f"SELECT {REQUEST_COLUMNS} FROM requests WHERE id = ?", (request_id,)
            ).fetchone()
            return request_from_row(row) if row else None

        return await self._run(_read)

    async def waiting_requests(self) -> list[ConsultRequest]:
        def _read(db: sqlite3.Connection) -> list[ConsultRequest]:
            rows = db.execute(
                f"SELECT {REQUEST_COLUMNS} FROM requests WHERE status = 'waiting'"
            ).fetchall()
            return [request_from_row(r) for r in rows]

        return await self._run(_read)

    async def requests_of(self, requester_id: str, limit: int = 50) -> list[ConsultRequest]:
        def _read(db: sqlite3.Connection) -> list[ConsultRequest]:
            rows = db.execute(
                f"SELECT {REQUEST_COLUMNS} FROM requests WHERE requester_id = ? "
                "ORDER BY created_at DESC LIMIT ?", (requester_id, limit),
            ).fetchall()
            return [request_from_row(r) for r in rows]

        return await self._run(_read)

    async def finish_request(self, request_id: str, status: str, at: float) -> bool:
        """Move a waiting request to ``cancelled`` or ``expired``; False if it was not waiting."""

        def _write(db: sqlite3.Connection) -> bool:
            with transaction(db):
                cursor = db.execute(
                    "UPDATE requests SET status = ?, closed_at = ? "
                    "WHERE id = ? AND status = 'waiting'", (status, at, request_id),
                )
                return cursor.rowcount == 1

        return await self._run(_write)

    async def mark_escalated(self, request_id: str, at: float) -> bool:
        def _write(db: sqlite3.Connection) -> bool:
            with transaction(db):
                cursor = db.execute(
                    "UPDATE requests SET escalated_at = ? WHERE id = ? AND escalated_at IS NULL",
                    (at, request_id),
                )
            return cursor.rowcount == 1

        return await self._run(_write)

    async def claim(self, request_id: str, clinician_id: str, consultation: Consultation,
                    at: float) -> None:
        """Atomically accept a waiting request and create its consultation.

        Raises AlreadyTaken if someone else accepted it first, InvalidState if it is no longer
        waiting for another reason, NotFound if there is no such request.
        """

        def _write(db: sqlite3.Connection) -> None:
            with transaction(db):
                cursor = db.execute(
                    "UPDATE requests SET status = 'accepted', accepted_by = ?, accepted_at = ?, "
                    "consultation_id = ? WHERE id = ? AND status = 'waiting'",
                    (clinician_id, at, consultation.id, request_id),
                )
                if cursor.rowcount != 1:
                    row = db.execute(
                        "SELECT status FROM requests WHERE id = ?", (request_id,)
                    ).fetchone()
                    if row is None:
                        raise NotFound(f"no consult request {request_id!r}")
                    if row[0] in ("accepted", "closed"):
                        raise AlreadyTaken(ALREADY_TAKEN.format(request_id))
                    raise InvalidState(f"consult request {request_id!r} is {row[0]}")
                _insert_consultation(db, consultation)

        await self._run(_write)

    # -- consultations ---------------------------------------------------------------------
    async def get_consultation(self, consultation_id: str) -> Consultation | None:
        def _read(db: sqlite3.Connection) -> Consultation | None:
            row = db.execute(
                f"SELECT {CONSULTATION_COLUMNS} FROM consultations WHERE id = ?",
                (consultation_id,),
            ).fetchone()
            return consultation_from_row(row) if row else None

        return await self._run(_read)

    async def active_consultations(self) -> list[Consultation]:
        def _read(db: sqlite3.Connection) -> list[Consultation]:
            rows = db.execute(
                f"SELECT {CONSULTATION_COLUMNS} FROM consultations WHERE state != 'ended'"
            ).fetchall()
            return [consultation_from_row(r) for r in rows]

        return await self._run(_read)

    async def consultations_for(self, clinician_id: str, site_id: str, *, everything: bool,
                                limit: int = 100) -> list[Consultation]:
        """Consultations the clinician is named on or whose sites were invited (all of them
        when ``everything``), newest first."""

        def _read(db: sqlite3.Connection) -> list[Consultation]:
            if everything:
                rows = db.execute(
                    f"SELECT {CONSULTATION_COLUMNS} FROM consultations "
                    "ORDER BY created_at DESC LIMIT ?", (limit,),
                ).fetchall()
            else:
                rows = db.execute(
                    f"SELECT {CONSULTATION_COLUMNS} FROM consultations WHERE id IN ("
                    " SELECT c.id FROM consultations c, json_each(c.clinician_ids) j"
                    " WHERE j.value = ?"
                    " UNION SELECT c.id FROM consultations c, json_each(c.invited_site_ids) j"
                    " WHERE j.value = ?) ORDER BY created_at DESC LIMIT ?",
                    (clinician_id, site_id, limit),
                ).fetchall()
            return [consultation_from_row(r) for r in rows]

        return await self._run(_read)

    async def save_consultation(self, consultation: Consultation) -> None:
        def _write(db: sqlite3.Connection) -> None:
            with transaction(db):
                db.execute(
                    "UPDATE consultations SET state = ?, started_at = ?, ended_at = ?, "
                    "site_ids = ?, clinician_ids = ?, invited_site_ids = ?, relay_id = ? "
                    "WHERE id = ? AND state != 'ended'",
                    (consultation.state, consultation.started_at, consultation.ended_at,
                     json.dumps(consultation.site_ids), json.dumps(consultation.clinician_ids),
                     json.dumps(consultation.invited_site_ids), consultation.relay_id,
                     consultation.id),
                )

        await self._run(_write)

    async def end_consultation(self, consultation: Consultation, minutes: Minutes) -> None:
        """Store the minutes, end the consultation and close its request, in one transaction."""

        def _write(db: sqlite3.Connection) -> None:
            with transaction(db):
                cursor = db.execute(
                    "UPDATE consultations SET state = 'ended', ended_at = ?, conclusion = ?, "
                    "signed_by = ?, signed_at = ? WHERE id = ? AND state != 'ended'",
                    (minutes.signed_at, minutes.conclusion, minutes.signed_by,
                     minutes.signed_at, consultation.id),
                )
                if cursor.rowcount != 1:
                    raise InvalidState(f"consultation {consultation.id!r} has already ended")
                db.execute(
                    "UPDATE requests SET status = 'closed', closed_at = ? WHERE id = ?",
                    (minutes.signed_at, consultation.request_id),
                )
                db.execute(
                    "UPDATE attendance SET left_at = ? WHERE consultation_id = ? "
                    "AND left_at IS NULL", (minutes.signed_at, consultation.id),
                )

        await self._run(_write)

    # -- chat and attendance ---------------------------------------------------------------
    async def add_chat(self, message: ChatMessage) -> None:
        def _write(db: sqlite3.Connection) -> None:
            with transaction(db):
                db.execute(
                    "INSERT INTO chat (id, consultation_id, sender_id, site_id, text, sent_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (message.id, message.consultation_id, message.sender_id, message.site_id,
                     message.text, message.sent_at),
                )

        await self._run(_write)

    async def chat_of(self, consultation_id: str) -> list[ChatMessage]:
        def _read(db: sqlite3.Connection) -> list[ChatMessage]:
            rows = db.execute(
                "SELECT id, consultation_id, sender_id, site_id, text, sent_at FROM chat "
                "WHERE consultation_id = ? ORDER BY sent_at, id", (consultation_id,),
            ).fetchall()
            return [ChatMessage(*r) for r in rows]

        return await self._run(_read)

    async def record_join(self, consultation_id: str, clinician_id: str, site_id: str,
                          at: float) -> None:
        def _write(db: sqlite3.Connection) -> None:
            with transaction(db):
                db.execute(
                    "INSERT INTO attendance (consultation_id, clinician_id, site_id, joined_at) "
                    "VALUES (?, ?, ?, ?)", (consultation_id, clinician_id, site_id, at),
                )

        await self._run(_write)

    async def record_leave(self, consultation_id: str, clinician_id: str, at: float) -> None:
        def _write(db: sqlite3.Connection) -> None:
            with transaction(db):
                db.execute(
                    "UPDATE attendance SET left_at = ? WHERE consultation_id = ? "
                    "AND clinician_id = ? AND left_at IS NULL", (at, consultation_id, clinician_id),
                )

        await self._run(_write)

    async def attendance_of(self, consultation_id: str) -> list[dict[str, Any]]:
        def _read(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                "SELECT clinician_id, site_id, joined_at, left_at FROM attendance "
                "WHERE consultation_id = ? ORDER BY joined_at", (consultation_id,),
            ).fetchall()
            return [{"clinician_id": r[0], "site_id": r[1], "joined_at": r[2], "left_at": r[3]}
                    for r in rows]

        return await self._run(_read)

    async def attendees_of(self, consultation_id: str) -> frozenset[str]:
        """The clinicians who joined the consultation at least once."""
        return frozenset(a["clinician_id"] for a in await self.attendance_of(consultation_id))


def _prepare(db: sqlite3.Connection) -> None:
    """The schema brought to the latest step (``signaling.migrations``; a file from before
    migrations is recognised as step 1)."""
    migrate_sqlite(db)


def write_directory(db: sqlite3.Connection, sites: list[Site], clinicians: list[Clinician],
                    regions: Mapping[str, str]) -> None:
    with transaction(db):
        db.executemany(
            "INSERT OR REPLACE INTO sites (id, name, tier, region, active, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(s.id, s.name, s.tier, s.region, int(s.active), s.updated_at) for s in sites],
        )
        db.executemany(
            "INSERT OR REPLACE INTO clinicians (id, name, site_id, roles, specialties, active, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(c.id, c.name, c.site_id, json.dumps(sorted(c.roles)),
              json.dumps(sorted(c.specialties)), int(c.active), c.updated_at)
             for c in clinicians],
        )
        db.executemany("INSERT OR REPLACE INTO regions (id, name) VALUES (?, ?)",
                       sorted(regions.items()))


def read_directory(db: sqlite3.Connection) -> Directory:
    sites = [Site(i, n, t, r, bool(a), u) for i, n, t, r, a, u in db.execute(
        "SELECT id, name, tier, region, active, updated_at FROM sites ORDER BY id")]
    clinicians = [
        Clinician(i, n, s, frozenset(json.loads(r)), frozenset(json.loads(sp)), bool(a), u)
        for i, n, s, r, sp, a, u in db.execute(
            "SELECT id, name, site_id, roles, specialties, active, updated_at FROM clinicians "
            "ORDER BY id")]
    regions = dict(db.execute("SELECT id, name FROM regions"))
    return Directory(sites, clinicians, regions)


def open_directory(path: Path, seed: Callable[[], tuple[Directory, str]]) -> Directory:
    """The directory in the store at ``path``; when the store has none yet, ``seed()`` gives
    one (and says where from) and it is written first. Synchronous: start-up and the CLI call
    it before any event loop work, and the server's own connection opens afterwards (WAL lets
    both share the file)."""
    db = connect(path, synchronous="FULL")
    try:
        _prepare(db)
        directory = read_directory(db)
        if directory.all_sites:
            logger.info("directory: %d sites, %d clinicians (%d active) from the store %s; a "
                        "directory file is only an import source now", len(directory.all_sites),
                        len(directory.all_clinicians), len(directory.clinicians), path)
            return directory
        directory, source = seed()
        write_directory(db, list(directory.all_sites.values()),
                        list(directory.all_clinicians.values()), directory.regions)
        logger.info("directory: the store %s was empty; seeded with %d sites and %d clinicians "
                    "from %s (from now on the store is the directory: change it with the admin "
                    "API or `telehealth directory import`)", path, len(directory.all_sites),
                    len(directory.all_clinicians), source)
        return directory
    finally:
        db.close()


def _insert_consultation(db: sqlite3.Connection, c: Consultation) -> None:
    db.execute(
        f"INSERT INTO consultations ({CONSULTATION_COLUMNS}) VALUES "
        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (c.id, c.request_id, c.host_id, c.relay_id, c.state, c.created_at, c.started_at,
         c.ended_at, json.dumps(c.site_ids), json.dumps(c.clinician_ids),
         json.dumps(c.invited_site_ids), None, None, None),
    )
