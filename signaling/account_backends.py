"""Where the accounts live, from the settings (as ``signaling.records`` does for the
records): with ``storage.backend = "sqlite"`` their own file ``<data_dir>/accounts.sqlite3``
(apart from ``records.sqlite3``); with ``"postgresql"`` the records' database, in tables of
their own (``signaling.accounts_pg``), so every process of a fleet shares them. The strikes of
client addresses and unknown identifiers follow the live state: in this process's memory, or
in Redis with ``live.backend = "redis"`` (``signaling.accounts_redis``)."""

from __future__ import annotations

import hashlib

from config.settings import Settings
from recorder.audit import AuditLog
from signaling.accounts import (
    ACCOUNTS_FILE,
    Accounts,
    AccountStore,
    MemoryStrikes,
    SqliteAccountStore,
    StrikeStore,
)
from signaling.accounts_pg import PostgresAccountStore
from signaling.accounts_redis import RedisStrikes
from signaling.directory import Directory
from signaling.tokens import TokenAuthority, load_or_create_secret

ACCOUNTS_POOL_MAX = 4
"""The accounts' own PostgreSQL connections per process at most (beside the records'
``storage.postgresql_pool_size``): a sign-in is a few short statements, its cost is the
Argon2 hash on ``accounts.hash_threads`` threads, not the database."""


def account_store(settings: Settings) -> AccountStore:
    """The accounts' store, not opened yet."""
    storage = settings.storage
    if storage.backend == "postgresql":
        return PostgresAccountStore(storage.postgresql_dsn,
                                    min(ACCOUNTS_POOL_MAX, storage.postgresql_pool_size))
    return SqliteAccountStore(storage.data_dir / ACCOUNTS_FILE)


def strike_store(settings: Settings) -> StrikeStore:
    """Where addresses' and unknown identifiers' strikes are counted, not opened yet."""
    size = settings.accounts.tracked_addresses
    if settings.live.backend == "redis":
        secret = load_or_create_secret(settings.security.token_secret,
                                       settings.storage.data_dir)
        key = hashlib.sha256(b"telehealth strikes\0" + secret.encode("utf-8")).digest()
        return RedisStrikes.from_url(settings.live.redis_url, prefix=settings.live.key_prefix,
                                     size=size, key=key)
    return MemoryStrikes(size)


def accounts_for(settings: Settings, *, directory: Directory, tokens: TokenAuthority,
                 audit: AuditLog) -> Accounts:
    """The accounts as ``settings`` place them (``await accounts.open()`` next)."""
    return Accounts(account_store(settings), directory=directory, tokens=tokens,
                    settings=settings.accounts, audit=audit, strikes=strike_store(settings))
