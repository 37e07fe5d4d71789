"""Accounts in PostgreSQL (``storage.backend = "postgresql"``): the same
``signaling.accounts.AccountStore`` as the SQLite file, in the records' database, so that every
`serve` process of a fleet knows a password set, a code issued, a session opened or a strike
counted on any other (a doctor activated on one node signs in on the next; a session opened on
one renews on another).

Their own tables, all named ``account*`` (``accounts``, ``account_activations``,
``account_sessions``, ``account_refresh_tokens``), and their own numbered schema steps
(``STEPS``, recorded in ``account_schema_migrations``, applied at open under their own advisory
lock), apart from the records' ``signaling.migrations`` on purpose: credentials are backed up,
retained and wiped on another schedule than consultation records (``pg_dump
--exclude-table='account*'`` gives a records dump without a single password hash), and on
SQLite they are another file whose version one records' step number could not describe.

The same guarantees as the SQLite file, across processes:
- a refresh-token rotation is one transaction that locks the family's row (``SELECT ... FOR
  UPDATE``): two nodes presenting one token at once are served one after the other; the first
  rotates it, the second finds it no longer current and revokes the family (as a token reused
  on one node does);
- a strike is read, counted and written in one transaction under the account's row lock: the
  counters are exact whichever nodes the failures reach;
- an activation code and a TOTP step are used once (conditional DELETE / UPDATE).
Every connection sets ``synchronous_commit = on``; every wait is bounded (``timeout_s``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from signaling.accounts import SCHEMA, AccountRow, AccountsUnavailable, Judge, Strikes
from signaling.migrations import apply_postgresql_steps, postgresql_version
from signaling.migrations.step import Step
from signaling.store_pg import TIMEOUT_S, close_pool, open_pool, redacted

logger = logging.getLogger(__name__)

STEP_1 = """
CREATE TABLE IF NOT EXISTS accounts (
    clinician_id TEXT PRIMARY KEY, password_hash TEXT, totp_secret TEXT,
    totp_last_step BIGINT NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,
    lockouts INTEGER NOT NULL DEFAULT 0, locked_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_failure_at DOUBLE PRECISION NOT NULL DEFAULT 0, password_set_at DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS account_activations (
    clinician_id TEXT PRIMARY KEY, code_hash TEXT NOT NULL UNIQUE,
    expires_at DOUBLE PRECISION NOT NULL, issued_at DOUBLE PRECISION NOT NULL,
    issued_by TEXT NOT NULL, pending_totp TEXT
);
CREATE TABLE IF NOT EXISTS account_sessions (
    family_id TEXT PRIMARY KEY, clinician_id TEXT NOT NULL, current_hash TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL, refreshed_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION, end_reason TEXT
);
CREATE INDEX IF NOT EXISTS account_sessions_clinician ON account_sessions (clinician_id);
CREATE INDEX IF NOT EXISTS account_sessions_started ON account_sessions (started_at);
CREATE TABLE IF NOT EXISTS account_refresh_tokens (
    token_hash TEXT PRIMARY KEY, family_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS account_refresh_tokens_family ON account_refresh_tokens (family_id);
"""

STEPS: tuple[Step, ...] = (
    # The SQLite text is the accounts file's schema, which stays unnumbered (created if
    # missing): listed so that both say the same step.
    Step(1, "accounts as they were", sqlite=SCHEMA, postgresql=STEP_1),
)
LATEST = STEPS[-1].version

UNAVAILABLE = (OSError, TimeoutError, asyncpg.InterfaceError,
               asyncpg.exceptions.PostgresConnectionError,
               asyncpg.exceptions.OperatorInterventionError)
"""What a call meets while the database is away (unreachable, restarting, shut down, the
connection cut): the client is answered ``accounts_unavailable`` (503), not a 500."""

ADVISORY_LOCK = 0x7E1E_4EA1_0000_0016
"""Held while an accounts step is applied (the records' steps hold ``...0014``)."""

VERSIONS_TABLE = "account_schema_migrations"


async def schema_version(conn: Any) -> int:
    """The accounts' schema step in the database behind ``conn`` (0: none yet)."""
    return await postgresql_version(conn, VERSIONS_TABLE)


async def migrate(conn: Any, steps: tuple[Step, ...] = STEPS) -> list[int]:
    """Apply the accounts' steps the database has not had, each in one transaction with its
    row (nodes starting together: one applies, the others wait and find it done)."""
    applied = await apply_postgresql_steps(conn, steps, table=VERSIONS_TABLE,
                                           lock=ADVISORY_LOCK, what="accounts")
    version = await schema_version(conn)
    if version > steps[-1].version:
        logger.warning("accounts are at schema step %d, newer than this program's %d (a newer "
                       "node migrated them?): used as they are", version, steps[-1].version)
    return applied


class PostgresAccountStore:
    """``AccountStore`` in the PostgreSQL database at ``dsn``, through at most ``pool_size``
    connections of its own (apart from the records' pool: a burst of sign-ins never waits
    behind the records' writes, nor they behind it)."""

    def __init__(self, dsn: str, pool_size: int = 4, *, timeout_s: float = TIMEOUT_S) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.timeout_s = timeout_s
        self._pool: Any = None
        self._closed = False

    async def open(self) -> None:
        self._pool, version = await open_pool(
            self.dsn, min_size=1, max_size=self.pool_size, timeout_s=self.timeout_s,
            migrate=migrate, version=schema_version)
        logger.info("accounts in PostgreSQL %s (schema step %d, %d connections at most)",
                    redacted(self.dsn), version, self.pool_size)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await close_pool(pool, self.timeout_s, "accounts")

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        if self._pool is None:
            raise RuntimeError(f"accounts store {redacted(self.dsn)} is closed")
        try:
            async with self._pool.acquire(timeout=self.timeout_s) as conn:
                yield conn
        except UNAVAILABLE as exc:
            # A transaction cut short is rolled back by the server: nothing half-written.
            logger.warning("accounts: PostgreSQL %s does not answer: %s: %s",
                           redacted(self.dsn), type(exc).__name__, exc)
            raise AccountsUnavailable("the accounts' database") from exc

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        async with self._connection() as conn, conn.transaction():
            yield conn

    async def forget_sessions_before(self, horizon: float) -> None:
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM account_refresh_tokens WHERE family_id IN (SELECT "
                               "family_id FROM account_sessions WHERE started_at < $1)", horizon)
            await conn.execute("DELETE FROM account_sessions WHERE started_at < $1", horizon)

    async def load(self, clinician_id: str) -> AccountRow | None:
        async with self._connection() as conn:
            return _row(await conn.fetchrow(_LOAD, clinician_id), clinician_id)

    async def write_activation(self, clinician_id: str, code_hash: str, expires_at: float,
                               issued_at: float, issued_by: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO account_activations (clinician_id, code_hash, expires_at, "
                "issued_at, issued_by, pending_totp) VALUES ($1, $2, $3, $4, $5, NULL) "
                "ON CONFLICT (clinician_id) DO UPDATE SET code_hash = excluded.code_hash, "
                "expires_at = excluded.expires_at, issued_at = excluded.issued_at, "
                "issued_by = excluded.issued_by, pending_totp = NULL",
                clinician_id, code_hash, expires_at, issued_at, issued_by)

    async def read_activation(self, code_hash: str) -> tuple[str, float, str | None, bool] | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT a.clinician_id, a.expires_at, a.pending_totp, "
                "coalesce(c.password_hash IS NOT NULL, false) AS had FROM account_activations a"
                " LEFT JOIN accounts c ON c.clinician_id = a.clinician_id "
                "WHERE a.code_hash = $1", code_hash)
        if row is None:
            return None
        return row["clinician_id"], row["expires_at"], row["pending_totp"], bool(row["had"])

    async def set_pending_totp(self, code_hash: str, secret: str) -> None:
        async with self._connection() as conn:
            await conn.execute("UPDATE account_activations SET pending_totp = $1 "
                               "WHERE code_hash = $2", secret, code_hash)

    async def use_activation(self, code_hash: str, clinician_id: str, password_hash: str,
                             totp_secret: str | None, totp_last_step: int, now: float) -> bool:
        async with self._transaction() as conn:
            used = await conn.fetchval("DELETE FROM account_activations WHERE code_hash = $1 "
                                       "AND expires_at > $2 RETURNING clinician_id",
                                       code_hash, time.time())
            if used is None:
                return False  # used meanwhile by another request, maybe on another node
            await conn.execute(
                "INSERT INTO accounts (clinician_id, password_hash, totp_secret, "
                "totp_last_step, password_set_at, created_at) VALUES ($1, $2, $3, $4, $5, $5) "
                "ON CONFLICT (clinician_id) DO UPDATE SET password_hash = excluded."
                "password_hash, totp_secret = excluded.totp_secret, totp_last_step = "
                "excluded.totp_last_step, password_set_at = excluded.password_set_at, "
                "failures = 0, lockouts = 0, locked_until = 0",
                clinician_id, password_hash, totp_secret, totp_last_step, now)
            await conn.execute("UPDATE account_sessions SET ended_at = $1, end_reason = "
                               "'password_set' WHERE clinician_id = $2 AND ended_at IS NULL",
                               now, clinician_id)
        return True

    async def succeed(self, clinician_id: str, totp_step: int | None, new_hash: str | None,
                      family: str, refresh_hash: str, now: float) -> bool:
        async with self._transaction() as conn:
            if totp_step is not None:
                # Conditional: two sign-ins racing with one code (on any nodes), one wins.
                won = await conn.fetchval(
                    "UPDATE accounts SET totp_last_step = $1 WHERE clinician_id = $2 AND "
                    "totp_last_step < $1 RETURNING 1", totp_step, clinician_id)
                if won is None:
                    return False
            await conn.execute(
                "UPDATE accounts SET failures = 0, lockouts = 0, locked_until = 0, "
                "password_hash = coalesce($2, password_hash) WHERE clinician_id = $1",
                clinician_id, new_hash)
            await _insert_session(conn, family, clinician_id, refresh_hash, now)
        return True

    async def strike(self, clinician_id: str, now: float, threshold: int, base_s: float,
                     max_s: float) -> tuple[Strikes, bool]:
        async with self._transaction() as conn:
            # The row lock makes a strike from another node wait for this one: exact counts.
            account = _row(await conn.fetchrow(_LOAD + " FOR UPDATE", clinician_id),
                           clinician_id)
            strikes = account.strikes if account is not None else Strikes()
            locked = strikes.strike(now, threshold, base_s, max_s)
            await conn.execute("UPDATE accounts SET failures = $1, lockouts = $2, "
                               "locked_until = $3, last_failure_at = $4 WHERE clinician_id = $5",
                               strikes.failures, strikes.lockouts, strikes.locked_until,
                               strikes.last_failure_at, clinician_id)
        return strikes, locked

    async def open_session(self, family: str, clinician_id: str, refresh_hash: str,
                           now: float) -> None:
        async with self._transaction() as conn:
            await _insert_session(conn, family, clinician_id, refresh_hash, now)

    async def rotate(self, token_hash: str, fresh_hash: str, now: float,
                     judge: Judge) -> tuple[str, str | None, float, str]:
        async with self._transaction() as conn:
            # FOR UPDATE OF s: a second presentation of the token (another node, the same
            # moment) waits here, then reads the family as the first one left it.
            row = await conn.fetchrow(
                "SELECT s.family_id, s.clinician_id, s.current_hash, s.started_at, "
                "s.refreshed_at, s.ended_at FROM account_refresh_tokens t JOIN "
                "account_sessions s ON s.family_id = t.family_id WHERE t.token_hash = $1 "
                "FOR UPDATE OF s", token_hash)
            if row is None:
                return "unknown", None, 0.0, ""
            family, clinician_id = row["family_id"], row["clinician_id"]
            started = float(row["started_at"])
            if row["ended_at"] is not None:
                return "ended", clinician_id, started, family
            why = "reused" if row["current_hash"] != token_hash \
                else judge(clinician_id, started, float(row["refreshed_at"]))
            if why is not None:
                await conn.execute("UPDATE account_sessions SET ended_at = $1, end_reason = $2"
                                   " WHERE family_id = $3", now, why, family)
                return why, clinician_id, started, family
            await conn.execute("UPDATE account_sessions SET current_hash = $1, refreshed_at = "
                               "$2 WHERE family_id = $3", fresh_hash, now, family)
            await conn.execute("INSERT INTO account_refresh_tokens (token_hash, family_id) "
                               "VALUES ($1, $2)", fresh_hash, family)
            return "ok", clinician_id, started, family

    async def end_session(self, token_hash: str, now: float) -> tuple[str, str] | None:
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "UPDATE account_sessions s SET ended_at = $2, end_reason = 'signout' FROM "
                "account_refresh_tokens t WHERE t.token_hash = $1 AND s.family_id = "
                "t.family_id AND s.ended_at IS NULL RETURNING s.family_id, s.clinician_id",
                token_hash, now)
        return None if row is None else (row["family_id"], row["clinician_id"])


_LOAD = ("SELECT password_hash, totp_secret, totp_last_step, failures, lockouts, locked_until, "
         "last_failure_at FROM accounts WHERE clinician_id = $1")


def _row(row: Any, clinician_id: str) -> AccountRow | None:
    if row is None:
        return None
    return AccountRow(clinician_id, row["password_hash"], row["totp_secret"],
                      int(row["totp_last_step"]),
                      Strikes(row["failures"], row["lockouts"], float(row["locked_until"]),
                              float(row["last_failure_at"])))


async def _insert_session(conn: Any, family: str, clinician_id: str, refresh_hash: str,
                          now: float) -> None:
    await conn.execute("INSERT INTO account_sessions (family_id, clinician_id, current_hash, "
                       "started_at, refreshed_at) VALUES ($1, $2, $3, $4, $4)",
                       family, clinician_id, refresh_hash, now)
    await conn.execute("INSERT INTO account_refresh_tokens (token_hash, family_id) "
                       "VALUES ($1, $2)", refresh_hash, family)
