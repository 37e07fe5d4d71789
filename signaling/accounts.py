"""Accounts: clinicians sign in by themselves with an identifier (their clinician id), a
password and, for some roles, a TOTP code; a signed-in browser holds a short-lived access token
(the JWT of ``signaling.tokens``, unchanged claims) and a refresh token that is rotated on
every use.

Credentials live apart from the records on purpose: password hashes, TOTP secrets and
refresh-token hashes are backed up, retained and wiped on another schedule than consultation
records (a records backup handed to an archive must not carry them, and a lost password must
never be restored from an old backup). Where, follows ``storage.backend``
(``signaling.account_backends``): with ``sqlite``, their own file
``<data_dir>/accounts.sqlite3`` (``SqliteAccountStore``, created mode 0600, every query on one
dedicated thread as in ``signaling.store``); with ``postgresql``, tables of their own in the
records' database (``signaling.accounts_pg``), shared by every process of a fleet with the
same guarantees. ``Accounts`` holds the rules; an ``AccountStore`` only keeps the rows, and
each of its calls that settles a race (a code used, a TOTP step, a strike, a refresh-token
rotation) is one transaction.

Password hashes are Argon2id (argon2-cffi) with the cost of ``[accounts]``; a hash made with
an older cost is redone at the next successful sign-in. Hashing and verifying run on a small
thread pool of ``accounts.hash_threads`` threads: a burst of sign-ins waits in its queue
instead of stalling the event loop or starting a thread each.

What an attacker learns is kept equal: an unknown identifier is verified against a dummy hash
(the same time as a known one) and answered ``invalid_credentials`` like a wrong password; both
count towards the lockout, a known account in its store, an unknown identifier with the
addresses. The client address is counted too, with its own, higher threshold (a site's
clinicians share one NAT address): both in a bounded table (``StrikeStore``), in memory, or in
Redis with ``live.backend = "redis"`` (``signaling.accounts_redis``: a fleet counts them
together).

Activation and reset codes and refresh tokens are random (192 and 256 bits) and stored only
as SHA-256 hashes: with that much entropy a slow hash adds nothing. TOTP secrets are stored as
they are (base32) in the 0600 file or the accounts table: encrypting them needs a key kept
elsewhere and a cryptography dependency the project does not declare yet. They are never
logged nor audited.

Audit (``recorder.audit.AuditLog``, the archive's hash-chained log; ``consultation_id`` is
None): sign-in, failed sign-in, lockout, activation issued and used, password reset,
sign-out and the revocation of a refresh family, with the client address. Never a password,
a code, a TOTP secret, nor an identifier nobody has (it may be a password typed in the wrong
field).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pyotp
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from config.settings import AccountsSettings
from recorder.audit import AuditLog
from signaling import password_policy
from signaling.directory import Directory
from signaling.errors import NotFound, SignalingError, Unauthenticated
from signaling.models import Clinician
from signaling.sqlite import SqliteFile, transaction
from signaling.tokens import TokenAuthority

logger = logging.getLogger(__name__)

T = TypeVar("T")

ACCOUNTS_FILE = "accounts.sqlite3"
TOTP_PERIOD_S = 30
FORGET_LOCKOUTS_AFTER_S = 3600.0
"""A lockout counter (the doubling) starts again after this long without a failure."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    clinician_id TEXT PRIMARY KEY, password_hash TEXT, totp_secret TEXT,
    totp_last_step INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,
    lockouts INTEGER NOT NULL DEFAULT 0, locked_until REAL NOT NULL DEFAULT 0,
    last_failure_at REAL NOT NULL DEFAULT 0, password_set_at REAL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS activations (
    clinician_id TEXT PRIMARY KEY, code_hash TEXT NOT NULL UNIQUE, expires_at REAL NOT NULL,
    issued_at REAL NOT NULL, issued_by TEXT NOT NULL, pending_totp TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
    family_id TEXT PRIMARY KEY, clinician_id TEXT NOT NULL, current_hash TEXT NOT NULL,
    started_at REAL NOT NULL, refreshed_at REAL NOT NULL, ended_at REAL, end_reason TEXT
);
CREATE INDEX IF NOT EXISTS sessions_clinician ON sessions (clinician_id);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash TEXT PRIMARY KEY, family_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family ON refresh_tokens (family_id);
"""


# -- errors (each a stable code for clients) ----------------------------------------------------
class InvalidCredentials(Unauthenticated):
    """A wrong password or an unknown identifier: the same answer for both."""

    def __init__(self) -> None:
        super().__init__("the identifier or the password is wrong", code="invalid_credentials")


class LockedOut(SignalingError):
    code = "locked_out"
    http_status = 429

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = max(1, int(retry_after_s + 0.999))
        super().__init__(f"too many failed sign-ins; try again in {self.retry_after_s} s")

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        wire["error"]["retry_after_s"] = self.retry_after_s
        return wire


class ActivationInvalid(SignalingError):
    code = "activation_invalid"

    def __init__(self) -> None:
        super().__init__("this activation code is unknown, expired or already used; ask for "
                         "a new one")


class AccountsUnavailable(SignalingError):
    """The accounts' database or the Redis counting strikes does not answer (a fleet's
    shared stores): sign-ins, activations and refreshes wait for it, none is decided
    without it (a lockout not counted, a token not rotated)."""

    code = "accounts_unavailable"
    http_status = 503

    def __init__(self, what: str) -> None:
        super().__init__(f"sign-in is unavailable for a moment ({what} does not answer); "
                         "try again shortly")


class WeakPassword(SignalingError):
    code = "weak_password"


class TotpSetupRequired(SignalingError):
    """Activation of an account with a second factor: add the secret to an authenticator
    app, then send the code it shows with the password."""

    code = "totp_setup_required"

    def __init__(self, provisioning_uri: str, secret: str) -> None:
        super().__init__("add this account to an authenticator app, then send its 6-digit "
                         "code as totp together with the password")
        self.provisioning_uri = provisioning_uri
        self.secret = secret

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        wire["error"]["provisioning_uri"] = self.provisioning_uri
        wire["error"]["secret"] = self.secret
        return wire


class TotpInvalid(SignalingError):
    code = "totp_invalid"
    http_status = 401

    def __init__(self) -> None:
        super().__init__("the authenticator code is wrong or was already used; wait for the "
                         "next one")


def totp_required() -> Unauthenticated:
    return Unauthenticated("this account needs the 6-digit code of its authenticator app",
                           code="totp_required")


def session_ended(why: str) -> Unauthenticated:
    return Unauthenticated(f"the session has ended ({why}); sign in again",
                           code="session_ended")


# -- lockout with back-off (pure) ----------------------------------------------------------------
@dataclass
class Strikes:
    """Failed sign-ins of one account or one address."""

    failures: int = 0
    lockouts: int = 0
    locked_until: float = 0.0
    last_failure_at: float = 0.0

    def retry_after(self, now: float) -> float:
        return max(0.0, self.locked_until - now)

    def strike(self, now: float, threshold: int, base_s: float, max_s: float) -> bool:
        """Count a failure; True when it locks (``base_s`` doubled per earlier lockout, at
        most ``max_s``)."""
        if now - self.last_failure_at > FORGET_LOCKOUTS_AFTER_S:
            self.failures = 0
            self.lockouts = 0
        self.last_failure_at = now
        self.failures += 1
        if self.failures < threshold:
            return False
        self.locked_until = now + min(max_s, base_s * 2 ** min(self.lockouts, 30))
        self.lockouts += 1
        self.failures = 0
        return True


class StrikeTable:
    """Strikes by key (a client address, an unknown identifier) in memory, at most
    ``size`` keys: the least recently struck are forgotten first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._table: OrderedDict[str, Strikes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def get(self, key: str) -> Strikes:
        return self._table.get(key) or Strikes()

    def put(self, key: str, strikes: Strikes) -> None:
        self._table[key] = strikes
        self._table.move_to_end(key)
        while len(self._table) > self._size:
            self._table.popitem(last=False)


# -- password hashing off the loop -------------------------------------------------------------
class PasswordHashing:
    """Argon2id hashing and verifying on ``threads`` threads."""

    def __init__(self, settings: AccountsSettings) -> None:
        self.hasher = PasswordHasher(time_cost=settings.argon2_time_cost,
                                     memory_cost=settings.argon2_memory_kib,
                                     parallelism=settings.argon2_parallelism, type=Type.ID)
        self._executor = ThreadPoolExecutor(max_workers=settings.hash_threads,
                                            thread_name_prefix="argon2",
                                            initializer=_lower_priority,
                                            initargs=(settings.hash_nice,))
        self._dummy: str | None = None

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def hash(self, password: str) -> str:
        return await self._run(lambda: self.hasher.hash(password))

    async def verify(self, hashed: str | None, password: str) -> bool:
        """Whether ``password`` matches ``hashed``; with no hash, the same work against a
        dummy one (an unknown account takes as long as a known one) and False."""
        if hashed is None:
            if self._dummy is None:
                self._dummy = await self.hash(secrets.token_urlsafe(16))
            dummy = self._dummy
            await self._run(lambda: _verify(self.hasher, dummy, password))
            return False
        return await self._run(lambda: _verify(self.hasher, hashed, password))

    def needs_rehash(self, hashed: str) -> bool:
        return self.hasher.check_needs_rehash(hashed)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority(nice: int) -> None:
    """Renice the calling thread (Linux applies ``setpriority`` to one thread by its id):
    argon2-cffi releases the GIL, so hashing threads run beside the event loop and, at the
    same priority, take a 2-core server's cores from it under load."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    except OSError as exc:
        logger.warning("accounts: could not lower the hashing thread's priority: %s", exc)


def _verify(hasher: PasswordHasher, hashed: str, password: str) -> bool:
    try:
        return hasher.verify(hashed, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def digest(secret: str) -> str:
    """How codes and refresh tokens are stored (high-entropy secrets: SHA-256 is enough)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def totp_step(secret: str, code: str, now: float, last_step: int) -> int | None:
    """The time step ``code`` is valid for (this one, or one before or after for clock
    drift), provided it is later than ``last_step`` (a code is used once); else None."""
    totp = pyotp.TOTP(secret, interval=TOTP_PERIOD_S)
    current = int(now // TOTP_PERIOD_S)
    for step in (current - 1, current, current + 1):
        if step > last_step and hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


# -- results --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Activation:
    clinician_id: str
    code: str
    expires_at: float


@dataclass(frozen=True)
class SignedIn:
    """What a sign-in or a refresh hands the browser: the access token (JSON body) and the
    next refresh token (the cookie), which is valid until ``session_ends_at`` at most."""

    clinician_id: str
    access_token: str
    expires_at: float
    refresh_token: str
    session_ends_at: float
    idle_timeout_s: float
    """A session not refreshed for this long ends (the page stops refreshing when idle)."""


@dataclass
class AccountRow:
    """One account as its store holds it."""

    clinician_id: str
    password_hash: str | None
    totp_secret: str | None
    totp_last_step: int
    strikes: Strikes = field(default_factory=Strikes)


Judge = Callable[[str, float, float], str | None]
"""Why a session may not be refreshed (``expired``, ``idle``, ``removed``) or None, from its
clinician, start and last refresh: ``Accounts`` decides, the store asks inside its
transaction."""


class AccountStore(Protocol):
    """Where the accounts are kept: ``SqliteAccountStore`` (one `serve`, today's file) or
    ``signaling.accounts_pg.PostgresAccountStore`` (a fleet). Each method is one transaction;
    those that decide a race (``use_activation``, ``succeed``, ``strike``, ``rotate``) decide
    it there, so two processes on one database see one winner."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def forget_sessions_before(self, horizon: float) -> None:
        """Delete the sessions (and their refresh tokens) started before ``horizon``."""

    async def load(self, clinician_id: str) -> AccountRow | None: ...

    async def write_activation(self, clinician_id: str, code_hash: str, expires_at: float,
                               issued_at: float, issued_by: str) -> None:
        """The clinician's one activation code (replacing any earlier one)."""

    async def read_activation(self, code_hash: str) -> tuple[str, float, str | None, bool] | None:
        """(clinician, expires_at, pending TOTP secret, has a password already) or None."""

    async def set_pending_totp(self, code_hash: str, secret: str) -> None: ...

    async def use_activation(self, code_hash: str, clinician_id: str, password_hash: str,
                             totp_secret: str | None, totp_last_step: int, now: float) -> bool:
        """Use the code up (if still unexpired and unused: False otherwise), set the
        password and TOTP, clear the strikes and end the clinician's open sessions."""

    async def succeed(self, clinician_id: str, totp_step: int | None, new_hash: str | None,
                      family: str, refresh_hash: str, now: float) -> bool:
        """A sign-in's writes: the TOTP step used (False if another sign-in used it first),
        the strikes cleared, the rehashed password, the new session."""

    async def strike(self, clinician_id: str, now: float, threshold: int, base_s: float,
                     max_s: float) -> tuple[Strikes, bool]:
        """Count a failure against the account: its strikes after, and whether it locked."""

    async def open_session(self, family: str, clinician_id: str, refresh_hash: str,
                           now: float) -> None: ...

    async def rotate(self, token_hash: str, fresh_hash: str, now: float,
                     judge: Judge) -> tuple[str, str | None, float, str]:
        """(outcome, clinician, started_at, family) of presenting refresh token
        ``token_hash``: ``ok`` (``fresh_hash`` is now the family's current token),
        ``unknown``, ``ended``, ``reused`` (not the current token: the family ends) or what
        ``judge`` said (the family ends)."""

    async def end_session(self, token_hash: str, now: float) -> tuple[str, str] | None:
        """End the open session of the token's family: (family, clinician) or None."""


class StrikeStore(Protocol):
    """Strikes of what has no account row: client addresses (``kind`` ``address``) and
    unknown identifiers (``unknown``), at most ``accounts.tracked_addresses`` keys of each.
    ``MemoryStrikes`` (one process) or ``signaling.accounts_redis.RedisStrikes`` (shared by
    a fleet's processes through Redis)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, kind: str, key: str) -> Strikes: ...

    async def strike(self, kind: str, key: str, now: float, threshold: int, base_s: float,
                     max_s: float) -> tuple[Strikes, bool]:
        """Count a failure: the strikes after, and whether it locked."""

    async def forgive(self, kind: str, key: str) -> None:
        """A success from there: its failures start again (its lockouts' doubling stays)."""


class MemoryStrikes:
    """``StrikeStore`` in this process's memory: a bounded ``StrikeTable`` per kind."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._tables: dict[str, StrikeTable] = {}

    def _table(self, kind: str) -> StrikeTable:
        table = self._tables.get(kind)
        if table is None:
            table = self._tables[kind] = StrikeTable(self._size)
        return table

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def get(self, kind: str, key: str) -> Strikes:
        return replace(self._table(kind).get(key))

    async def strike(self, kind: str, key: str, now: float, threshold: int, base_s: float,
                     max_s: float) -> tuple[Strikes, bool]:
        strikes = replace(self._table(kind).get(key))
        locked = strikes.strike(now, threshold, base_s, max_s)
        self._table(kind).put(key, strikes)
        return replace(strikes), locked

    async def forgive(self, kind: str, key: str) -> None:
        strikes = replace(self._table(kind).get(key), failures=0)
        self._table(kind).put(key, strikes)


ADDRESS = "address"
UNKNOWN = "unknown"


@dataclass
class _Turns:
    """The sign-in attempts on one identifier: one at a time, ``count`` under way or
    waiting."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    count: int = 0


# -- the SQLite file ------------------------------------------------------------------------------
class SqliteAccountStore(SqliteFile):
    """``AccountStore`` in ``<data_dir>/accounts.sqlite3`` (mode 0600), every query on its
    one thread; the schema is ``SCHEMA``, created if missing (this file has no numbered
    steps: ``signaling.accounts_pg`` has for PostgreSQL)."""

    # synchronous=NORMAL, not FULL like the records: a commit survives the process dying,
    # and a power cut may take back the last moments as a whole (a sign-in's session, a
    # strike, a code used with the password it set: consistent, the doctor signs in again).
    # A sign-in then costs no disk flush, which the records' durable pairing would queue
    # behind (docs/benchmarks.md, sign-in load).
    def __init__(self, path: Path) -> None:
        super().__init__(path, name="accounts", synchronous="NORMAL", mode=0o600)

    def _prepare(self, db: sqlite3.Connection) -> None:
        db.executescript(SCHEMA)

    async def forget_sessions_before(self, horizon: float) -> None:
        def _forget(db: sqlite3.Connection) -> None:
            with transaction(db):
                old = "SELECT family_id FROM sessions WHERE started_at < ?"
                db.execute(f"DELETE FROM refresh_tokens WHERE family_id IN ({old})",
                           (horizon,))
                db.execute("DELETE FROM sessions WHERE started_at < ?", (horizon,))

        await self._run(_forget)

    async def load(self, clinician_id: str) -> AccountRow | None:
        return await self._run(lambda db: _load(db, clinician_id))

    async def write_activation(self, clinician_id: str, code_hash: str, expires_at: float,
                               issued_at: float, issued_by: str) -> None:
        await self._run(lambda db: db.execute(
            "INSERT OR REPLACE INTO activations (clinician_id, code_hash, expires_at, "
            "issued_at, issued_by, pending_totp) VALUES (?, ?, ?, ?, ?, NULL)",
            (clinician_id, code_hash, expires_at, issued_at, issued_by)))

    async def read_activation(self, code_hash: str) -> tuple[str, float, str | None, bool] | None:
        def _read(db: sqlite3.Connection) -> tuple[str, float, str | None, bool] | None:
            row = db.execute("SELECT clinician_id, expires_at, pending_totp FROM activations "
                             "WHERE code_hash = ?", (code_hash,)).fetchone()
            if row is None:
                return None
            had = db.execute("SELECT password_hash IS NOT NULL FROM accounts "
                             "WHERE clinician_id = ?", (row[0],)).fetchone()
            return row[0], row[1], row[2], bool(had and had[0])

        return await self._run(_read)

    async def set_pending_totp(self, code_hash: str, secret: str) -> None:
        await self._run(lambda db: db.execute(
            "UPDATE activations SET pending_totp = ? WHERE code_hash = ?", (secret, code_hash)))

    async def use_activation(self, code_hash: str, clinician_id: str, password_hash: str,
                             totp_secret: str | None, totp_last_step: int, now: float) -> bool:
        def _apply(db: sqlite3.Connection) -> bool:
            with transaction(db):
                used = db.execute("DELETE FROM activations WHERE code_hash = ? AND "
                                  "expires_at > ?", (code_hash, time.time())).rowcount
                if used != 1:
                    return False  # used meanwhile by another request
                db.execute(
                    "INSERT INTO accounts (clinician_id, password_hash, totp_secret, "
                    "totp_last_step, password_set_at, created_at) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (clinician_id) DO UPDATE SET password_hash = excluded."
                    "password_hash, totp_secret = excluded.totp_secret, totp_last_step = "
                    "excluded.totp_last_step, password_set_at = excluded.password_set_at, "
                    "failures = 0, lockouts = 0, locked_until = 0",
                    (clinician_id, password_hash, totp_secret, totp_last_step, now, now))
                db.execute("UPDATE sessions SET ended_at = ?, end_reason = 'password_set' "
                           "WHERE clinician_id = ? AND ended_at IS NULL", (now, clinician_id))
            return True

        return await self._run(_apply)

    async def succeed(self, clinician_id: str, totp_step: int | None, new_hash: str | None,
                      family: str, refresh_hash: str, now: float) -> bool:
        def _succeed(db: sqlite3.Connection) -> bool:
            with transaction(db):
                if totp_step is not None:
                    # Conditional: two sign-ins racing with one code, one wins.
                    won = db.execute("UPDATE accounts SET totp_last_step = ? WHERE "
                                     "clinician_id = ? AND totp_last_step < ?",
                                     (totp_step, clinician_id, totp_step)).rowcount
                    if not won:
                        return False
                db.execute("UPDATE accounts SET failures = 0, lockouts = 0, locked_until = 0"
                           " WHERE clinician_id = ?", (clinician_id,))
                if new_hash is not None:
                    db.execute("UPDATE accounts SET password_hash = ? WHERE clinician_id = ?",
                               (new_hash, clinician_id))
                _insert_session(db, family, clinician_id, refresh_hash, now)
            return True

        return await self._run(_succeed)

    async def strike(self, clinician_id: str, now: float, threshold: int, base_s: float,
                     max_s: float) -> tuple[Strikes, bool]:
        def _strike(db: sqlite3.Connection) -> tuple[Strikes, bool]:
            with transaction(db):
                account = _load(db, clinician_id)
                strikes = account.strikes if account is not None else Strikes()
                locked = strikes.strike(now, threshold, base_s, max_s)
                db.execute("UPDATE accounts SET failures = ?, lockouts = ?, locked_until = ?, "
                           "last_failure_at = ? WHERE clinician_id = ?",
                           (strikes.failures, strikes.lockouts, strikes.locked_until,
                            strikes.last_failure_at, clinician_id))
            return strikes, locked

        return await self._run(_strike)

    async def open_session(self, family: str, clinician_id: str, refresh_hash: str,
                           now: float) -> None:
        def _open(db: sqlite3.Connection) -> None:
            with transaction(db):
                _insert_session(db, family, clinician_id, refresh_hash, now)

        await self._run(_open)

    async def rotate(self, token_hash: str, fresh_hash: str, now: float,
                     judge: Judge) -> tuple[str, str | None, float, str]:
        def _rotate(db: sqlite3.Connection) -> tuple[str, str | None, float, str]:
            with transaction(db):
                row = db.execute(
                    "SELECT s.family_id, s.clinician_id, s.current_hash, s.started_at, "
                    "s.refreshed_at, s.ended_at FROM refresh_tokens t JOIN sessions s ON "
                    "s.family_id = t.family_id WHERE t.token_hash = ?",
                    (token_hash,)).fetchone()
                if row is None:
                    return "unknown", None, 0.0, ""
                family, clinician_id, current, started, refreshed, ended = row
                if ended is not None:
                    return "ended", clinician_id, started, family
                why = "reused" if current != token_hash \
                    else judge(clinician_id, started, refreshed)
                if why is not None:
                    db.execute("UPDATE sessions SET ended_at = ?, end_reason = ? "
                               "WHERE family_id = ?", (now, why, family))
                    return why, clinician_id, started, family
                db.execute("UPDATE sessions SET current_hash = ?, refreshed_at = ? "
                           "WHERE family_id = ?", (fresh_hash, now, family))
                db.execute("INSERT INTO refresh_tokens (token_hash, family_id) VALUES (?, ?)",
                           (fresh_hash, family))
                return "ok", clinician_id, started, family

        return await self._run(_rotate)

    async def end_session(self, token_hash: str, now: float) -> tuple[str, str] | None:
        def _end(db: sqlite3.Connection) -> tuple[str, str] | None:
            with transaction(db):
                row = db.execute(
                    "SELECT s.family_id, s.clinician_id FROM refresh_tokens t JOIN sessions s"
                    " ON s.family_id = t.family_id WHERE t.token_hash = ? AND s.ended_at IS "
                    "NULL", (token_hash,)).fetchone()
                if row is None:
                    return None
                db.execute("UPDATE sessions SET ended_at = ?, end_reason = 'signout' "
                           "WHERE family_id = ?", (now, row[0]))
                return row[0], row[1]

        return await self._run(_end)


def _load(db: sqlite3.Connection, clinician_id: str) -> AccountRow | None:
    row = db.execute("SELECT password_hash, totp_secret, totp_last_step, failures, lockouts, "
                     "locked_until, last_failure_at FROM accounts WHERE clinician_id = ?",
                     (clinician_id,)).fetchone()
    if row is None:
        return None
    return AccountRow(clinician_id, row[0], row[1], row[2],
                      Strikes(row[3], row[4], row[5], row[6]))


def _insert_session(db: sqlite3.Connection, family: str, clinician_id: str,
                    refresh_hash: str, now: float) -> None:
    db.execute("INSERT INTO sessions (family_id, clinician_id, current_hash, started_at, "
               "refreshed_at) VALUES (?, ?, ?, ?, ?)",
               (family, clinician_id, refresh_hash, now, now))
    db.execute("INSERT INTO refresh_tokens (token_hash, family_id) VALUES (?, ?)",
               (refresh_hash, family))


# -- the accounts -------------------------------------------------------------------------------
class Accounts:
    """The accounts of the directory's clinicians. ``await open()``, ``await close()``.
    ``store``: an ``AccountStore``, or the path of the SQLite file; ``strikes``: where the
    addresses' and unknown identifiers' strikes are counted (default: this process's
    memory). ``signaling.account_backends.accounts_for`` picks both from the settings."""

    def __init__(self, store: AccountStore | Path, *, directory: Directory,
                 tokens: TokenAuthority, settings: AccountsSettings, audit: AuditLog,
                 strikes: StrikeStore | None = None) -> None:
        self.store: AccountStore = SqliteAccountStore(store) if isinstance(store, Path) \
            else store
        self.settings = settings
        self._directory = directory
        self._tokens = tokens
        self._audit = audit
        self.hashing = PasswordHashing(settings)
        self.strikes: StrikeStore = strikes if strikes is not None \
            else MemoryStrikes(settings.tracked_addresses)
        self._attempts: dict[str, _Turns] = {}
        """Sign-ins under way or waiting, by identifier (only while there are some)."""

    # -- plumbing ---------------------------------------------------------------------------
    async def open(self) -> None:
        await self.store.open()
        try:
            await self.strikes.open()
            # Sessions that ended long ago only take room.
            await self.store.forget_sessions_before(time.time() - 2 * self.settings.session_max_s)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        try:
            await self.strikes.close()
        finally:
            await self.store.close()
            self.hashing.close()
    async def _record(self, actor: str, action: str, **detail: Any) -> None:
        try:
            await self._audit.append_async(actor, action, None, detail)
        except OSError:
            logger.exception("audit: could not append %s by %s", action, actor)

    def clinician(self, clinician_id: str) -> Clinician | None:
        """The directory's clinician (None when unknown or deactivated)."""
        return self._directory.clinician(clinician_id)

    def needs_totp(self, clinician_id: str) -> bool:
        clinician = self._directory.clinician(clinician_id)
        required = set(self.settings.totp_required_roles)
        return clinician is not None and bool(clinician.roles & required)

    # -- activation and reset ---------------------------------------------------------------
    async def issue_activation(self, clinician_id: str, *, actor: str,
                               address: str | None) -> Activation:
        """A new one-time code for ``clinician_id`` (the previous one stops working)."""
        if self._directory.clinician(clinician_id) is None:
            raise NotFound(f"no clinician {clinician_id!r} in the directory")
        code = secrets.token_urlsafe(24)
        now = time.time()
        expires_at = now + self.settings.activation_ttl_s

        await self.store.write_activation(clinician_id, digest(code), expires_at, now, actor)
        logger.info("accounts: activation code issued for %s by %s", clinician_id, actor)
        await self._record(actor, "account.activation_issued", subject=clinician_id,
                           expires_at=round(expires_at, 3), address=address)
        return Activation(clinician_id, code, expires_at)

    async def activate(self, code: str, password: str, *, totp: str | None = None,
                       enable_totp: bool = False, address: str | None = None) -> str:
        """Set the password of the account ``code`` was issued for (and its TOTP secret,
        where required or asked for) and use the code up; return the clinician id. Every
        other session of the clinician ends (a reset is often a stolen password)."""
        now = time.time()
        code_hash = digest(code)

        found = await self.store.read_activation(code_hash)
        if found is None or found[1] <= now or self._directory.clinician(found[0]) is None:
            logger.info("accounts: activation refused from %s: unknown, expired or used code",
                        address)
            raise ActivationInvalid()
        clinician_id, _, pending, had_password = found
        reason = password_policy.problem(password, clinician_id)
        if reason is not None:
            raise WeakPassword(reason)
        secret: str | None = None
        step = 0
        if enable_totp or self.needs_totp(clinician_id):
            secret = pending or pyotp.random_base32()
            if pending is None:
                await self.store.set_pending_totp(code_hash, secret)
            if not totp:
                uri = pyotp.TOTP(secret).provisioning_uri(
                    name=clinician_id, issuer_name=self.settings.totp_issuer)
                raise TotpSetupRequired(uri, secret)
            matched = totp_step(secret, totp, now, 0)
            if matched is None:
                raise TotpInvalid()
            step = matched
        hashed = await self.hashing.hash(password)

        if not await self.store.use_activation(code_hash, clinician_id, hashed, secret, step,
                                               now):
            raise ActivationInvalid()
        action = "account.password_reset" if had_password else "account.activated"
        logger.info("accounts: %s for %s (totp %s)", action, clinician_id,
                    "on" if secret else "off")
        await self._record(clinician_id, action, subject=clinician_id, totp=secret is not None,
                           address=address)
        return clinician_id

    # -- sign-in ------------------------------------------------------------------------------
    async def sign_in(self, clinician_id: str, password: str, totp: str | None = None, *,
                      address: str) -> SignedIn:
        """Check the password (and TOTP) and open a session. Attempts on one identifier go
        one at a time: else a burst of parallel guesses would all be verified before the
        first failure is counted, and the lockout would come too late. One at a time in this
        process: a burst spread over a fleet's N nodes may have N - 1 more verified before
        the lock (tests/signaling/test_accounts_pg.py); every failure is still counted."""
        waiting = self._attempts.get(clinician_id)
        if waiting is None:
            waiting = self._attempts[clinician_id] = _Turns()
        waiting.count += 1
        try:
            async with waiting.lock:
                return await self._sign_in(clinician_id, password, totp, address)
        finally:
            waiting.count -= 1
            if waiting.count == 0:
                del self._attempts[clinician_id]

    async def _sign_in(self, clinician_id: str, password: str, totp: str | None,
                       address: str) -> SignedIn:
        now = time.time()
        account = await self.store.load(clinician_id)
        known = account is not None and account.password_hash is not None \
            and self._directory.clinician(clinician_id) is not None
        account_strikes = account.strikes if account is not None and known \
            else await self.strikes.get(UNKNOWN, clinician_id)
        address_strikes = await self.strikes.get(ADDRESS, address)
        wait = max(account_strikes.retry_after(now), address_strikes.retry_after(now))
        if wait > 0:
            logger.info("accounts: sign-in from %s refused: locked out (%.0f s)", address, wait)
            raise LockedOut(wait)
        ok = await self.hashing.verify(account.password_hash if account and known else None,
                                       password)
        if not ok or account is None:
            await self._failed(clinician_id, known, address, "password")
            raise InvalidCredentials()
        step: int | None = None
        if account.totp_secret is not None:
            if not totp:
                raise totp_required()
            step = totp_step(account.totp_secret, totp, time.time(), account.totp_last_step)
            if step is None:
                await self._failed(clinician_id, True, address, "totp")
                raise TotpInvalid()
        elif self.needs_totp(clinician_id):
            raise Unauthenticated("this account needs a second factor that is not set up "
                                  "yet; ask for a new activation code",
                                  code="totp_setup_required")
        rehash = account.password_hash is not None and \
            self.hashing.needs_rehash(account.password_hash)
        new_hash = await self.hashing.hash(password) if rehash else None
        refresh = secrets.token_urlsafe(32)
        family = secrets.token_urlsafe(12)

        if not await self.store.succeed(clinician_id, step, new_hash, family, digest(refresh),
                                        now):
            raise TotpInvalid()
        await self.strikes.forgive(ADDRESS, address)
        if new_hash is not None:
            logger.info("accounts: password hash of %s redone with the current cost",
                        clinician_id)
        logger.info("accounts: %s signed in from %s", clinician_id, address)
        await self._record(clinician_id, "auth.signin", subject=clinician_id, address=address,
                           session=family[:8])
        return self._signed_in(clinician_id, refresh, now)

    async def _failed(self, identifier: str, known: bool, address: str, factor: str) -> None:
        """Count a failed sign-in against the account (or the unknown identifier, unnamed)
        and the address, each in one step of its store (exact when several processes count
        at once); audit it, and the lockout it causes."""
        s = self.settings
        clinician_id = identifier if known else None
        now = time.time()
        if clinician_id is None:
            account_strikes, locked = await self.strikes.strike(
                UNKNOWN, identifier, now, s.lockout_failures, s.lockout_base_s, s.lockout_max_s)
        else:
            account_strikes, locked = await self.store.strike(
                clinician_id, now, s.lockout_failures, s.lockout_base_s, s.lockout_max_s)
        address_strikes, address_locked = await self.strikes.strike(
            ADDRESS, address, now, s.address_lockout_failures, s.lockout_base_s,
            s.lockout_max_s)
        logger.info("accounts: failed sign-in (%s) of %s from %s", factor,
                    clinician_id or "an unknown account", address)
        actor = clinician_id or "unknown"
        await self._record(actor, "auth.signin_failed", subject=clinician_id, factor=factor,
                           address=address)
        if locked:
            await self._record(actor, "auth.locked_out", subject=clinician_id,
                               scope="account", address=address,
                               seconds=round(account_strikes.retry_after(now)))
        if address_locked:
            await self._record(actor, "auth.locked_out", subject=clinician_id,
                               scope="address", address=address,
                               seconds=round(address_strikes.retry_after(now)))

    def _signed_in(self, clinician_id: str, refresh: str, started_at: float) -> SignedIn:
        now = time.time()
        ends = started_at + self.settings.session_max_s
        ttl = max(1, min(self.settings.access_ttl_s, int(ends - now)))
        token = self._tokens.issue(clinician_id, ttl_s=ttl, now=now)
        return SignedIn(clinician_id, token, float(int(now) + ttl), refresh, ends,
                        self.settings.idle_timeout_s)

    async def start_session(self, clinician_id: str, *, address: str,
                            method: str) -> SignedIn:
        """A session for a clinician someone else has authenticated (``method``: ``oidc``,
        the hospital's OpenID Connect issuer, see ``signaling.oidc``): the same refresh family
        and access token as a password sign-in, audited as a sign-in with its method. Such
        clinicians need no account row nor password here; the directory must hold them."""
        if self._directory.clinician(clinician_id) is None:
            raise NotFound(f"no clinician {clinician_id!r} in the directory")
        now = time.time()
        refresh = secrets.token_urlsafe(32)
        family = secrets.token_urlsafe(12)

        await self.store.open_session(family, clinician_id, digest(refresh), now)
        logger.info("accounts: %s signed in (%s) from %s", clinician_id, method, address)
        await self._record(clinician_id, "auth.signin", subject=clinician_id, method=method,
                           address=address, session=family[:8])
        return self._signed_in(clinician_id, refresh, now)

    # -- refresh and sign-out ---------------------------------------------------------------
    async def refresh(self, token: str, *, address: str) -> SignedIn:
        """A new access token and the next refresh token for ``token``, which is used up.
        Presenting a used-up refresh token again revokes the whole family (it was copied)."""
        now = time.time()
        fresh = secrets.token_urlsafe(32)
        s = self.settings

        def judge(clinician_id: str, started: float, refreshed: float) -> str | None:
            if now - started >= s.session_max_s:
                return "expired"
            if now - refreshed >= s.idle_timeout_s:
                return "idle"
            if self._directory.clinician(clinician_id) is None:
                return "removed"
            return None

        outcome, clinician_id, started, family = await self.store.rotate(
            digest(token), digest(fresh), now, judge)
        if outcome == "ok" and clinician_id is not None:
            return self._signed_in(clinician_id, fresh, started)
        logger.info("accounts: refresh from %s refused: %s%s", address, outcome,
                    f" (session of {clinician_id})" if clinician_id else "")
        if outcome == "reused" and clinician_id is not None:
            await self._record(clinician_id, "auth.refresh_family_revoked",
                               subject=clinician_id, reason="refresh token reused",
                               address=address, session=family[:8])
        elif outcome in ("expired", "idle") and clinician_id is not None:
            await self._record(clinician_id, "auth.session_ended", subject=clinician_id,
                               reason=outcome, address=address, session=family[:8])
        raise session_ended({"unknown": "unknown session", "ended": "signed out or revoked",
                             "reused": "this refresh token was already used; the session is "
                                       "revoked", "expired": "the shift's session is over",
                             "idle": "idle for too long",
                             "removed": "no longer in the directory"}[outcome])

    async def sign_out(self, token: str | None, *, address: str) -> bool:
        """End the session of refresh token ``token`` (any of its family). False if there
        was no such open session."""
        if not token:
            return False
        now = time.time()

        ended = await self.store.end_session(digest(token), now)
        if ended is None:
            return False
        family, clinician_id = ended
        logger.info("accounts: %s signed out from %s", clinician_id, address)
        await self._record(clinician_id, "auth.signout", subject=clinician_id, address=address,
                           session=family[:8])
        return True

