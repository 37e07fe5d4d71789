"""`serve` and the CLI on ``storage.backend = "postgresql"`` (a real PostgreSQL, started by the
tests): a request made, accepted, chatted on and ended lands in the database, not in the data
directory; a waiting request is restored by a process started on another data directory; and
`telehealth directory import|export` and `telehealth token` work on the database."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg

from config.settings import load_settings
from signaling.directory import Directory
from signaling.directory_admin import CSV_COLUMNS
from signaling.tokens import TokenAuthority
from tests.postgres_server import PostgresServer
from tests.support import (
    SECRET,
    clients,
    http_get,
    run_server,
    start_server_process,
    write_config,
)


def postgres_config(tmp: Path, dsn: str, node: str = "a") -> Path:
    """A config whose records are in ``dsn``; its own data directory (``node``)."""
    home = tmp / node
    home.mkdir(parents=True, exist_ok=True)
    return write_config(home, storage={"data_dir": str(home / "data"), "backend": "postgresql",
                                       "postgresql_dsn": dsn, "postgresql_pool_size": 4})


def telehealth(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "telehealth.cli", *args], capture_output=True,
                          text=True, timeout=60)


async def test_serve_on_postgresql_pairs_a_request_and_keeps_every_record_there(
        tmp_path: Path, postgres_dsn: str) -> None:
    config = postgres_config(tmp_path, postgres_dsn)
    async with run_server(config) as server:
        tokens = {n: server.token(n) for n in ("ref1", "cardio1", "cardio2")}
        async with clients(server.url, tokens) as c:
            started = time.perf_counter()
            asked = await c["ref1"].ok("consult:request", {
                "specialty": "cardiology", "priority": "urgent",
                "reason": "Đau ngực, ST chênh lên", "patient_pseudonym": "P-0042"})
            requested = time.perf_counter()
            rid = asked["request"]["id"]
            assert (await c["cardio1"].next("queue:update"))["request"]["id"] == rid
            accepted = await c["cardio1"].ok("consult:accept", {"request_id": rid})
            paired = time.perf_counter()
            cid = accepted["consultation"]["id"]
            assert (await c["ref1"].next("consult:ready"))["consultation"]["id"] == cid
            await c["cardio2"].refused("consult:accept", {"request_id": rid}, "already_taken")
            await c["ref1"].ok("consult:join", {"consultation_id": cid})
            await c["ref1"].ok("chat:send", {"consultation_id": cid, "text": "ECG attached"})
            await c["cardio1"].ok("consult:end", {"consultation_id": cid,
                                                  "conclusion": "Transfer for PCI."})
            print(f"on PostgreSQL: request acked in {(requested - started) * 1000:.1f} ms, "
                  f"accept acked in {(paired - requested) * 1000:.1f} ms")
        status, full = await http_get(f"{server.url}/api/consultations/{cid}",
                                      server.token("ref1"))
        assert status == 200 and full["consultation"]["minutes"]["conclusion"] == \
            "Transfer for PCI."
    # Everything is in the database; the data directory has no records file.
    conn = await asyncpg.connect(postgres_dsn)
    try:
        request = await conn.fetchrow("SELECT status, accepted_by, patient_pseudonym "
                                      "FROM requests WHERE id = $1", rid)
        consultation = await conn.fetchrow("SELECT state, conclusion, signed_by "
                                           "FROM consultations WHERE id = $1", cid)
        chat = await conn.fetch("SELECT text FROM chat WHERE consultation_id = $1", cid)
        sites = await conn.fetchval("SELECT count(*) FROM sites")
    finally:
        await conn.close()
    assert tuple(request) == ("closed", "cardio1", "P-0042")
    assert tuple(consultation) == ("ended", "Transfer for PCI.", "cardio1")
    assert [r[0] for r in chat] == ["ECG attached"] and sites == 6
    data = tmp_path / "a" / "data"
    assert not (data / "records.sqlite3").exists()
    assert not (data / "accounts.sqlite3").exists()  # the accounts are in PostgreSQL too


async def test_a_waiting_request_is_restored_by_a_process_on_another_data_directory(
        tmp_path: Path, postgres_dsn: str) -> None:
    async with run_server(postgres_config(tmp_path, postgres_dsn, "a")) as first, \
            clients(first.url, {"ref1": first.token("ref1")}) as c:
        asked = await c["ref1"].ok("consult:request", {
            "specialty": "cardiology", "priority": "stat", "reason": "stroke"})
    async with run_server(postgres_config(tmp_path, postgres_dsn, "b")) as second, \
            clients(second.url, {"cardio2": second.token("cardio2")}) as c:
        queue = (await c["cardio2"].ok("queue:get", {}))["queue"]
        assert [r["id"] for r in queue] == [asked["request"]["id"]]
        await c["cardio2"].ok("consult:accept", {"request_id": asked["request"]["id"]})


async def test_directory_import_export_and_token_on_postgresql(tmp_path: Path,
                                                               postgres_dsn: str) -> None:
    config = postgres_config(tmp_path, postgres_dsn)
    source = tmp_path / "new.csv"
    source.write_text(
        ",".join(CSV_COLUMNS) + "\n"
        + "clinician,bs-new,BS. Lê Minh Thư,c1,,,specialist,cardiology,true\n",
        encoding="utf-8")
    done = telehealth("--config", str(config), "directory", "import", str(source))
    assert done.returncode == 0, done.stderr
    exported = telehealth("--config", str(config), "directory", "export")
    assert exported.returncode == 0, exported.stderr
    assert "bs-new,BS. Lê Minh Thư" in exported.stdout and "ref1," in exported.stdout
    token = telehealth("--config", str(config), "token", "bs-new")
    assert token.returncode == 0, token.stderr
    # An activation code issued by the command line is one the server (any node) accepts.
    issued = telehealth("--config", str(config), "account", "activation", "bs-new")
    assert issued.returncode == 0, issued.stderr
    code = issued.stdout.split("code: ")[1].split()[0]
    async with run_server(config) as server:
        status, me = await http_get(f"{server.url}/api/me", token.stdout.split()[0])
        async with aiohttp.ClientSession() as http, http.post(
                f"{server.url}/api/auth/activate",
                json={"code": code, "password": "Phòng khám đảo 2026!"}) as response:
            activated = response.status, await response.json()
    assert status == 200 and me["clinician"]["id"] == "bs-new", me
    assert activated[0] == 200, activated
    assert not (tmp_path / "a" / "data" / "records.sqlite3").exists()


def test_records_that_cannot_be_opened_stop_serve_naming_the_setting(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    """Nothing listening, or a database that does not exist: `serve` exits 2 with the key and
    the reason (the password left out), as for any configuration problem."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    for dsn in (f"postgresql://telehealth:s3cret@127.0.0.1:{closed}/telehealth",
                postgres_server.dsn("no_such_database").replace("postgres@",
                                                                 "postgres:s3cret@")):
        config = postgres_config(tmp_path, dsn)
        started = time.monotonic()
        done = telehealth("--config", str(config), "serve")
        assert done.returncode == 2, done.stderr[-2000:]
        assert "storage.postgresql_dsn" in done.stderr and "cannot open the records" in \
            done.stderr, done.stderr[-2000:]
        assert "s3cret" not in done.stderr + done.stdout
        assert "Traceback" not in done.stderr
        print(f"{dsn.split('@')[1]}: exit 2 after {time.monotonic() - started:.1f} s")


async def test_acknowledged_records_survive_a_sigkill_of_serve_on_postgresql(
        tmp_path: Path, postgres_dsn: str) -> None:
    """The real `telehealth serve` on PostgreSQL, killed -9 right after its last ack: every
    acknowledged record is in the database, and a process on another data directory picks
    the waiting requests up."""
    config = postgres_config(tmp_path, postgres_dsn, "a")
    settings = load_settings(config)
    assert settings.directory.file is not None
    tokens = TokenAuthority(SECRET, Directory.load(settings.directory.file), 3600)
    token = {n: tokens.issue(n) for n in ("ref1", "ref2", "cardio1")}
    first = start_server_process(config)
    try:
        async with clients(first.url, token) as c:
            waiting = [(await c[who].ok("consult:request", {
                "specialty": "cardiology", "priority": "urgent", "reason": f"case {i}"}
            ))["request"]["id"] for i, who in enumerate(["ref1", "ref2", "ref1", "ref2"])]
            taken = waiting.pop(0)
            accepted = await c["cardio1"].ok("consult:accept", {"request_id": taken})
            cid = accepted["consultation"]["id"]
            await c["ref1"].ok("consult:join", {"consultation_id": cid})
            sent = await c["ref1"].ok("chat:send", {"consultation_id": cid, "text": "labs"})
            first.kill()  # the last ack has arrived: kill -9 now
    finally:
        if first.process.poll() is None:
            first.kill()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        statuses = dict(await conn.fetch("SELECT id, status FROM requests"))
        chat = await conn.fetchval("SELECT text FROM chat WHERE id = $1",
                                   sent["message"]["id"])
    finally:
        await conn.close()
    assert statuses == {taken: "accepted", **{r: "waiting" for r in waiting}}
    assert chat == "labs"
    second = start_server_process(postgres_config(tmp_path, postgres_dsn, "b"))
    try:
        async with clients(second.url, {"cardio1": token["cardio1"]}) as c:
            queue = (await c["cardio1"].ok("queue:get", {}))["queue"]
            assert sorted(r["id"] for r in queue) == sorted(waiting)
    finally:
        second.kill()
