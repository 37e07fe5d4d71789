"""Accounts shared by a fleet (``storage.backend = "postgresql"``, ``live.backend = "redis"``):
two ``Accounts`` on one real PostgreSQL and one real redis-server act as two `serve` nodes. A
session opened on one renews on the other; one refresh token presented on both at once is
rotated once and its family revoked, as a token reused on one node is; failed sign-ins are
counted exactly whichever node they reach (the account's in PostgreSQL, the address's and
unknown identifiers' in Redis, bounded); the accounts' schema steps are applied once by nodes
opening together, apart from the records'. Then two real `serve` apps: a clinician activated
on node A signs in on node B."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pyotp
import pytest
import redis.asyncio as aioredis

from config.settings import Settings, load_settings
from recorder.audit import AuditLog
from signaling.account_backends import accounts_for
from signaling.accounts import (
    Accounts,
    AccountsUnavailable,
    InvalidCredentials,
    LockedOut,
    SignedIn,
    Strikes,
    TotpSetupRequired,
)
from signaling.accounts_pg import PostgresAccountStore
from signaling.accounts_redis import RedisStrikes
from signaling.directory import Directory
from signaling.errors import Unauthenticated
from signaling.store_pg import PostgresRecordStore
from signaling.tokens import TokenAuthority
from tests.postgres_server import create_database, restart_postgres, start_postgres, stop_postgres
from tests.redis_server import RedisServer, start_redis, stop_redis
from tests.signaling.test_accounts import CHEAP, PASSWORD, SECOND, browser
from tests.signaling.test_fleet_timers import redis_on
from tests.support import SECRET, run_server, write_config


def node_settings(tmp_path: Path, name: str, dsn: str, redis: RedisServer, prefix: str,
                  **accounts: Any) -> Settings:
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    return load_settings(write_config(
        home, accounts={**CHEAP, **accounts}, server={"trusted_proxies": ["127.0.0.1"]},
        live={"backend": "redis", "redis_url": redis.url, "key_prefix": prefix},
        storage={"backend": "postgresql", "postgresql_dsn": dsn, "postgresql_pool_size": 4,
                 "data_dir": str(home / "data")}))


@asynccontextmanager
async def two_nodes(tmp_path: Path, dsn: str, redis: RedisServer,
                    **accounts: Any) -> AsyncIterator[tuple[Accounts, Accounts]]:
    """Two nodes' accounts on one database and one Redis, as start-up builds them."""
    prefix = f"acc-{secrets.token_hex(4)}:"
    async with AsyncExitStack() as stack:
        made = []
        for name in ("a", "b"):
            settings = node_settings(tmp_path, name, dsn, redis, prefix, **accounts)
            assert settings.directory.file is not None
            directory = Directory.load(settings.directory.file)
            accounts_ = accounts_for(settings, directory=directory,
                                     tokens=TokenAuthority(SECRET, directory, 3600),
                                     audit=AuditLog(tmp_path / name / "audit.log"))
            await accounts_.open()
            stack.push_async_callback(accounts_.close)
            made.append(accounts_)
        assert not (tmp_path / "a" / "data" / "accounts.sqlite3").exists()
        yield made[0], made[1]


async def activated(a: Accounts, clinician_id: str = "ref1") -> None:
    issued = await a.issue_activation(clinician_id, actor="admin", address=None)
    assert await a.activate(issued.code, PASSWORD, address="10.0.0.1") == clinician_id


def audit_actions(tmp_path: Path, name: str) -> list[str]:
    return [e["action"] for e in AuditLog(tmp_path / name / "audit.log").entries()]


async def test_a_session_opened_on_one_node_renews_and_ends_on_the_other(
        tmp_path: Path, postgres_dsn: str, redis_server: RedisServer) -> None:
    async with two_nodes(tmp_path, postgres_dsn, redis_server) as (a, b):
        code = (await b.issue_activation("ref1", actor="admin", address=None)).code
        assert await a.activate(code, PASSWORD, address="10.0.0.1") == "ref1"  # b's code
        signed = await b.sign_in("ref1", PASSWORD, address="10.0.0.1")  # a's password
        renewed = await a.refresh(signed.refresh_token, address="10.0.0.1")
        renewed = await b.refresh(renewed.refresh_token, address="10.0.0.1")
        assert renewed.clinician_id == "ref1" and renewed.session_ends_at == \
            signed.session_ends_at  # one session, its shift's end unchanged
        assert await a.sign_out(renewed.refresh_token, address="10.0.0.1")
        with pytest.raises(Unauthenticated) as ended:
            await b.refresh(renewed.refresh_token, address="10.0.0.1")
        assert ended.value.code == "session_ended"
        # A password reset on one node ends the sessions opened on the other.
        signed = await a.sign_in("ref1", PASSWORD, address="10.0.0.1")
        code = (await a.issue_activation("ref1", actor="admin", address=None)).code
        assert await b.activate(code, SECOND, address="10.0.0.1") == "ref1"
        with pytest.raises(Unauthenticated):
            await a.refresh(signed.refresh_token, address="10.0.0.1")
        with pytest.raises(InvalidCredentials):
            await a.sign_in("ref1", PASSWORD, address="10.0.0.1")
        assert (await a.sign_in("ref1", SECOND, address="10.0.0.1")).clinician_id == "ref1"
        # A session the hospital's issuer opened (OIDC) on one node renews on the other.
        sso = await b.start_session("ref2", address="10.0.0.1", method="oidc")
        assert (await a.refresh(sso.refresh_token, address="10.0.0.1")).clinician_id == "ref2"


async def test_one_refresh_token_on_both_nodes_at_once_wins_once_and_revokes_the_family(
        tmp_path: Path, postgres_dsn: str, redis_server: RedisServer) -> None:
    async with two_nodes(tmp_path, postgres_dsn, redis_server) as (a, b):
        await activated(a)
        took = []
        for _ in range(10):
            signed = await a.sign_in("ref1", PASSWORD, address="10.0.0.1")
            started = time.perf_counter()
            results = await asyncio.gather(
                a.refresh(signed.refresh_token, address="10.0.0.1"),
                b.refresh(signed.refresh_token, address="10.0.0.2"), return_exceptions=True)
            took.append(time.perf_counter() - started)
            winners = [r for r in results if isinstance(r, SignedIn)]
            losers = [r for r in results if isinstance(r, Unauthenticated)]
            assert len(winners) == 1 and len(losers) == 1, results
            assert losers[0].code == "session_ended" and "already used" in str(losers[0])
            # The family is revoked: the winner's fresh token is dead on both nodes.
            for node in (a, b):
                with pytest.raises(Unauthenticated) as dead:
                    await node.refresh(winners[0].refresh_token, address="10.0.0.1")
                assert "signed out or revoked" in str(dead.value)
        revoked = audit_actions(tmp_path, "a").count("auth.refresh_family_revoked") + \
            audit_actions(tmp_path, "b").count("auth.refresh_family_revoked")
        assert revoked == 10
        print(f"two nodes refreshing one token at once: {max(took) * 1000:.1f} ms at most")


async def test_one_totp_code_on_both_nodes_at_once_signs_in_once(
        tmp_path: Path, postgres_dsn: str, redis_server: RedisServer) -> None:
    async with two_nodes(tmp_path, postgres_dsn, redis_server) as (a, b):
        code = (await a.issue_activation("admin", actor="admin", address=None)).code
        with pytest.raises(TotpSetupRequired) as setup:
            await b.activate(code, PASSWORD, address="10.0.7.1")  # the secret kept on B
        totp = pyotp.TOTP(setup.value.secret)
        assert await a.activate(code, PASSWORD, totp=totp.now(), address="10.0.7.1") == "admin"
        following = totp.at(time.time() + 30)
        results = await asyncio.gather(
            a.sign_in("admin", PASSWORD, following, address="10.0.7.1"),
            b.sign_in("admin", PASSWORD, following, address="10.0.7.2"),
            return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["SignedIn", "TotpInvalid"]


async def test_failed_sign_ins_are_counted_exactly_across_nodes(
        tmp_path: Path, postgres_dsn: str, redis_server: RedisServer) -> None:
    async with two_nodes(tmp_path, postgres_dsn, redis_server, lockout_failures=3,
                         address_lockout_failures=4, lockout_base_s=30) as (a, b):
        await activated(a)
        # The account: three failures over both nodes lock it on both, right password or not.
        for node, address in ((a, "10.0.1.1"), (b, "10.0.1.2"), (a, "10.0.1.3")):
            with pytest.raises(InvalidCredentials):
                await node.sign_in("ref1", SECOND, address=address)
        for node in (a, b):
            with pytest.raises(LockedOut) as locked:
                await node.sign_in("ref1", PASSWORD, address="10.0.1.9")
            assert 28 <= locked.value.retry_after_s <= 30
        # An unknown identifier, likewise (in Redis): never a hint that it is unknown.
        for node, address in ((b, "10.0.2.1"), (a, "10.0.2.2"), (b, "10.0.2.3")):
            with pytest.raises(InvalidCredentials):
                await node.sign_in("nobody", SECOND, address=address)
        with pytest.raises(LockedOut):
            await a.sign_in("nobody", SECOND, address="10.0.2.4")
        # An address: four failures over both nodes on several identifiers lock it alone.
        for i, node in enumerate((a, b, a, b)):
            with pytest.raises(InvalidCredentials):
                await node.sign_in(f"guess{i}", SECOND, address="10.0.3.1")
        with pytest.raises(LockedOut):
            await b.sign_in("ref2", PASSWORD, address="10.0.3.1")
        # A burst over both nodes: each node takes one attempt on an account at a time, so at
        # most one attempt per other node was already being verified when the lock came.
        await activated(b, "ref2")
        burst = await asyncio.gather(*(
            (a, b)[i % 2].sign_in("ref2", SECOND, address=f"10.0.6.{i}") for i in range(8)),
            return_exceptions=True)
        wrong = sum(isinstance(r, InvalidCredentials) for r in burst)
        assert 3 <= wrong <= 4 and wrong + sum(isinstance(r, LockedOut) for r in burst) == 8
        print(f"a burst of 8 over 2 nodes on one account (lock at 3): {wrong} verified")
        locks = [e["detail"]["scope"] for name in ("a", "b")
                 for e in AuditLog(tmp_path / name / "audit.log").entries()
                 if e["action"] == "auth.locked_out"]
        assert sorted(locks) == ["account", "account", "account", "address"]
        raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            keys = str(await raw.keys("*strikes*"))
        finally:
            await raw.aclose()
        assert "10.0.3.1" in keys and "nobody" not in keys and "guess" not in keys


async def test_parallel_failures_on_both_nodes_are_all_counted(
        tmp_path: Path, postgres_dsn: str, redis_server: RedisServer) -> None:
    async with two_nodes(tmp_path, postgres_dsn, redis_server, lockout_failures=1000,
                         address_lockout_failures=1000) as (a, b):
        await activated(a)
        started = time.perf_counter()
        results = await asyncio.gather(*(
            (a if i % 2 else b).sign_in("ref1", SECOND, address=f"10.0.4.{i % 3}")
            for i in range(30)), return_exceptions=True)
        took = time.perf_counter() - started
        assert all(isinstance(r, InvalidCredentials) for r in results), results
        row = await a.store.load("ref1")
        assert row is not None and row.strikes.failures == 30
        addresses = [await b.strikes.get("address", f"10.0.4.{i}") for i in range(3)]
        assert [s.failures for s in addresses] == [10, 10, 10]
        print(f"30 failed sign-ins over 2 nodes at once: {took:.2f} s, all 30 counted")


async def test_the_redis_strike_table_is_bounded_and_expires(redis_server: RedisServer) -> None:
    prefix = f"bound-{secrets.token_hex(4)}:"
    one = RedisStrikes.from_url(redis_server.url, prefix=prefix, size=3, key=b"fleet key")
    two = RedisStrikes.from_url(redis_server.url, prefix=prefix, size=3, key=b"fleet key")
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await one.open()
        await two.open()
        now = time.time()
        for i in range(5):
            await (one if i % 2 else two).strike("address", f"10.9.0.{i}", now + i, 10, 30, 900)
        index = await raw.zrange(prefix + "strikes:address", 0, -1)
        assert index == ["10.9.0.2", "10.9.0.3", "10.9.0.4"]
        assert await raw.exists(prefix + "strikes:address:10.9.0.0") == 0
        assert await two.get("address", "10.9.0.0") == Strikes()
        ttl = await raw.pttl(prefix + "strikes:address:10.9.0.4")
        assert 3_500_000 < ttl <= 3_600_000
        # A lockout lasting longer than the hour keeps its key that long.
        strikes, locked = await one.strike("unknown", "hunter2 typed here", now, 1, 7200, 7200)
        assert locked and strikes.locked_until == pytest.approx(now + 7200, abs=1e-3)
        assert (await two.get("unknown", "hunter2 typed here")).lockouts == 1
        # An unknown identifier (maybe a password) is in Redis only as its HMAC.
        [name] = await raw.zrange(prefix + "strikes:unknown", 0, -1)
        assert len(name) == 64 and "hunter2" not in str(await raw.keys(prefix + "*"))
        assert await raw.pttl(f"{prefix}strikes:unknown:{name!s}") > 7_000_000
        # Forgiving a success keeps the doubling, restarts the failures.
        await one.strike("address", "10.9.0.4", now + 5, 10, 30, 900)
        await two.forgive("address", "10.9.0.4")
        after = await one.get("address", "10.9.0.4")
        assert after.failures == 0 and after.last_failure_at == pytest.approx(now + 5)
        # Counted exactly when both strike at once.
        await asyncio.gather(*((one, two)[i % 2].strike("address", "10.9.1.1", now + 10,
                                                          1000, 30, 900) for i in range(40)))
        assert (await one.get("address", "10.9.1.1")).failures == 40
    finally:
        await one.close()
        await two.close()
        await raw.aclose()


async def test_the_accounts_schema_steps_apply_once_apart_from_the_records(
        postgres_dsn: str) -> None:
    stores = [PostgresAccountStore(postgres_dsn, 2) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    records = PostgresRecordStore(postgres_dsn, 2)
    await records.open()
    try:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            rows = await conn.fetch("SELECT version FROM account_schema_migrations")
            assert [r["version"] for r in rows] == [1]
            record_steps = await conn.fetch("SELECT version FROM schema_migrations")
            assert [r["version"] for r in record_steps] == [1, 2]  # the records' own line
            tables = {r["tablename"] for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            assert {"accounts", "account_activations", "account_sessions",
                    "account_refresh_tokens"} <= tables
        finally:
            await conn.close()
    finally:
        await records.close()
        for s in stores:
            await s.close()


async def test_a_clinician_activated_on_serve_node_a_signs_in_on_node_b(
        tmp_path: Path, postgres_dsn: str, redis_server: RedisServer) -> None:
    prefix = f"serve-{secrets.token_hex(4)}:"
    configs = []
    for name in ("a", "b"):
        home = tmp_path / name
        home.mkdir()
        configs.append(write_config(
            home, accounts={**CHEAP, "address_lockout_failures": 4},
            server={"trusted_proxies": ["127.0.0.1"]},
            live={"backend": "redis", "redis_url": redis_server.url, "key_prefix": prefix},
            storage={"backend": "postgresql", "postgresql_dsn": postgres_dsn,
                     "postgresql_pool_size": 4, "data_dir": str(home / "data")}))
    async with run_server(configs[0]) as node_a, run_server(configs[1]) as node_b, \
            browser(node_a) as on_a, browser(node_b) as on_b:
        code = await on_a.activation("ref1")
        status, body = await on_a.post("/api/auth/activate",
                                       {"code": code, "password": PASSWORD})
        assert status == 200, body
        status, body = await on_b.sign_in("ref1", PASSWORD)
        assert status == 200, body
        status, me = await on_a.get("/api/me", body["access_token"])
        assert (status, me["clinician"]["id"]) == (200, "ref1"), me
        # The session opened on node B renews on node A (the cookie moves with the page as
        # nginx sends it to either), and signing out on B ends it for A too.
        status, body = await on_a.post("/api/auth/refresh", cookie=on_b.cookie or "")
        assert status == 200, body
        on_b.cookie = on_a.cookie
        assert (await on_b.post("/api/auth/signout"))[0] == 200
        status, body = await on_a.post("/api/auth/refresh")
        assert (status, body["error"]["code"]) == (401, "session_ended")
        # Failed sign-ins from one address count together on both nodes (Redis): the fifth
        # is refused, on whichever node (per node, it would take eight).
        answers = []
        for i, node in enumerate((on_a, on_b) * 3):
            node.address = "10.7.7.7"
            status, body = await node.sign_in(f"guess{i}", SECOND)
            answers.append((status, body["error"]["code"]))
        assert answers == [(401, "invalid_credentials")] * 4 + [(429, "locked_out")] * 2
        assert not (tmp_path / "a" / "data" / "accounts.sqlite3").exists()
        assert not (tmp_path / "b" / "data" / "accounts.sqlite3").exists()


async def test_a_store_away_answers_accounts_unavailable_and_then_carries_on(
        tmp_path: Path) -> None:
    """Redis, then PostgreSQL, stopped under running nodes: a sign-in is refused
    ``accounts_unavailable`` (503) at once, never decided without its store; each back on
    its port, the next sign-in works and nothing was lost."""
    (tmp_path / "redis").mkdir()
    redis = start_redis(tmp_path / "redis")
    postgres = start_postgres()
    again: subprocess.Popen[bytes] | None = None
    try:
        dsn = create_database(postgres)
        async with two_nodes(tmp_path, dsn, redis) as (a, b):
            await activated(a)
            assert (await b.sign_in("ref1", PASSWORD, address="10.0.5.1")).clinician_id
            refused = []
            stop_redis(redis)
            for node in (a, b):
                started = time.perf_counter()
                with pytest.raises(AccountsUnavailable) as away:
                    await node.sign_in("ref1", PASSWORD, address="10.0.5.1")
                refused.append(time.perf_counter() - started)
                assert away.value.http_status == 503
            port = int(redis.url.rsplit(":", 1)[1].split("/")[0])
            again = redis_on(port, tmp_path / "redis")
            signed = None
            for _ in range(50):  # redis-server starts in well under 5 s
                await asyncio.sleep(0.1)
                with contextlib.suppress(AccountsUnavailable):
                    signed = await a.sign_in("ref1", PASSWORD, address="10.0.5.1")
                    break
            assert signed is not None
            stop_postgres(postgres, remove=False)
            started = time.perf_counter()
            with pytest.raises(AccountsUnavailable):
                await b.refresh(signed.refresh_token, address="10.0.5.1")
            refused.append(time.perf_counter() - started)
            restart_postgres(postgres)
            renewed = await b.refresh(signed.refresh_token, address="10.0.5.1")
            assert renewed.clinician_id == "ref1"  # the refused call rotated nothing
            print("store away: refused in " + ", ".join(f"{t * 1000:.0f}" for t in refused)
                  + " ms (Redis on a, b; PostgreSQL on b)")
            assert max(refused) < 5.0
    finally:
        if again is not None:
            again.kill()
            again.wait(timeout=10)
        stop_redis(redis)
        stop_postgres(postgres)
