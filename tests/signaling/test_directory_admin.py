"""Directory administration on a running server (signaling.directory_admin over the HTTP API):
changes take effect without a restart and survive one; a deactivated clinician's socket is
closed within a second and their token refused; a site admin stays within their site; every
bad input gets a clear error and changes nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from recorder.audit import AUDIT_LOG, AuditLog
from signaling.recording import ArchiveDescription
from signaling.store import SqliteRecordStore
from telehealth.startup import SERVICES
from tests.signaling.test_permissions import connect_refusal
from tests.support import Client, Server, clients, run_server, write_config

pytestmark = pytest.mark.asyncio


class Api:
    """JSON calls to the directory API as one clinician."""

    def __init__(self, server: Server, session: aiohttp.ClientSession, clinician: str) -> None:
        self.server = server
        self.session = session
        self.headers = {"Authorization": f"Bearer {server.token(clinician)}"}

    async def call(self, method: str, path: str, body: Any = None, *, raw: str | None = None,
                   params: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else None
        async with self.session.request(
                method, self.server.url + path, json=body if raw is None else None, data=data,
                params=params, headers=self.headers) as response:
            return response.status, await response.json()

    async def ok(self, method: str, path: str, body: Any = None,
                 **kwargs: Any) -> dict[str, Any]:
        status, answer = await self.call(method, path, body, **kwargs)
        assert status in (200, 201), (status, answer)
        return answer

    async def refused(self, method: str, path: str, body: Any, status: int, code: str,
                      **kwargs: Any) -> str:
        got, answer = await self.call(method, path, body, **kwargs)
        assert (got, answer["error"]["code"]) == (status, code), answer
        assert answer["error"]["message"]
        return str(answer["error"]["message"])


async def _me(server: Server, token: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/api/me",
                               headers={"Authorization": f"Bearer {token}"}) as response:
            return response.status, await response.json()


async def test_changes_take_effect_at_once_and_survive_a_restart(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    async with run_server(config) as server, aiohttp.ClientSession() as session:
        admin = Api(server, session, "admin")
        site = await admin.ok("POST", "/api/directory/sites", {
            "id": "tyt-langson", "name": "Trạm Y tế xã Đồng Đăng", "tier": "commune",
            "region": "20"})
        assert site["site"]["active"] is True
        await admin.ok("POST", "/api/directory/clinicians", {
            "id": "bs-nga", "name": "BS. Lương Thị Nga", "site": "tyt-langson",
            "roles": ["referring"]})
        # Signed in at once, on HTTP and on a socket, without a restart.
        token = server.token("bs-nga")
        status, me = await _me(server, token)
        assert status == 200 and me["site"]["id"] == "tyt-langson"
        nga = await Client(server.url, token).connect()
        try:
            found = await admin.ok("GET", "/api/directory/clinicians",
                                   params={"q": "luong thi", "active": "true"})
            assert [c["id"] for c in found["clinicians"]] == ["bs-nga"]
            assert found["clinicians"][0]["online"] is True
            assert found["clinicians"][0]["site_name"] == "Trạm Y tế xã Đồng Đăng"
            # An edit is seen by the next lookup.
            await admin.ok("PATCH", "/api/directory/clinicians/bs-nga",
                           {"specialties": ["pediatrics"], "roles": ["referring",
                                                                     "specialist"]})
            status, me = await _me(server, server.token("bs-nga"))
            assert me["clinician"]["specialties"] == ["pediatrics"]
            assert "pediatrics" in me["offered_specialties"]
        finally:
            await nga.close()
        offline = await admin.ok("GET", "/api/directory/clinicians", params={"q": "bs-nga"})
        assert offline["clinicians"][0]["online"] is False
        await admin.ok("PATCH", "/api/directory/sites/c2", {"name": "Bệnh viện Chợ Rẫy"})
        await admin.ok("PUT", "/api/directory/regions/20", {"name": "Lạng Sơn"})
        status, me = await _me(server, server.token("bs-nga"))
        assert me["site"]["region_name"] == "Lạng Sơn"
        await admin.refused("PUT", "/api/directory/regions/20", {"name": ""}, 400,
                            "invalid_payload")
        await Api(server, session, "coord").refused(
            "PUT", "/api/directory/regions/20", {"name": "X"}, 403, "forbidden")
    # The store is the directory now: the file's "Central Two" does not come back.
    async with run_server(config) as server, aiohttp.ClientSession() as session:
        admin = Api(server, session, "admin")
        assert server.tokens.issue("bs-nga")
        sites = await admin.ok("GET", "/api/directory/sites", params={"q": "cho ray"})
        assert [s["id"] for s in sites["sites"]] == ["c2"]
        assert sites["sites"][0]["name"] == "Bệnh viện Chợ Rẫy"
    entries = [e for e in AuditLog(server.settings.archive_dir() / AUDIT_LOG).entries()
               if e["action"].startswith("directory.")]
    assert [(e["actor"], e["action"], e["detail"]["id"]) for e in entries] == [
        ("admin", "directory.site.create", "tyt-langson"),
        ("admin", "directory.clinician.create", "bs-nga"),
        ("admin", "directory.clinician.edit", "bs-nga"),
        ("admin", "directory.site.edit", "c2"),
        ("admin", "directory.region.set", "20"),
    ]
    assert entries[2]["detail"]["changes"] == {"roles": ["referring", "specialist"],
                                               "specialties": ["pediatrics"]}
    assert AuditLog(server.settings.archive_dir() / AUDIT_LOG).verify() == []


async def test_a_deactivated_clinician_is_signed_out_within_a_second(tmp_path: Path) -> None:
    async with run_server(write_config(tmp_path)) as server, \
            aiohttp.ClientSession() as session:
        admin = Api(server, session, "admin")
        token = server.token("ref1")
        ref1 = await Client(server.url, token).connect()
        second = await Client(server.url, token).connect()
        other = await Client(server.url, server.token("ref2")).connect()
        try:
            closed = [asyncio.Event(), asyncio.Event()]
            for client, event in zip((ref1, second), closed, strict=True):
                client.sio.on("disconnect", event.set)
            started = time.monotonic()
            answer = await admin.ok("POST", "/api/directory/clinicians/ref1/deactivate")
            ended = await ref1.next("session:ended", timeout=1.0)
            async with asyncio.timeout(1.0):
                for event in closed:
                    await event.wait()
            elapsed = time.monotonic() - started
            print(f"deactivation to both sockets closed: {elapsed * 1000:.0f} ms")
            assert not ref1.sio.connected and not second.sio.connected and elapsed < 1.0
            assert ended["code"] == "clinician_inactive" and ended["message"]
            assert answer["clinician"]["active"] is False
            assert other.sio.connected  # nobody else is touched
            status, body = await _me(server, token)
            assert (status, body["error"]["code"]) == (401, "unknown_clinician")
            assert (await connect_refusal(server, {"token": token}))["code"] == \
                "unknown_clinician"
            # Reactivated: the same token works again.
            await admin.ok("POST", "/api/directory/clinicians/ref1/reactivate")
            assert (await _me(server, token))[0] == 200

            # A deactivated site: its clinicians are signed out and cannot sign in.
            await admin.ok("POST", "/api/directory/sites/d2/deactivate")
            assert (await other.next("session:ended", timeout=1.0))["code"] == \
                "clinician_inactive"
            status, body = await _me(server, server.token("admin"))
            assert status == 200
            status, body = await _me(server, other.token or "")
            assert (status, body["error"]["code"]) == (401, "unknown_clinician")
            listed = await admin.ok("GET", "/api/directory/clinicians", params={"site": "d2"})
            assert [(c["id"], c["active"], c["site_active"]) for c in listed["clinicians"]] == \
                [("ref2", True, False)]
            inactive = await admin.ok("GET", "/api/directory/sites", params={"active": "false"})
            assert [s["id"] for s in inactive["sites"]] == ["d2"]
        finally:
            for client in (ref1, second, other):
                await client.close()


async def test_a_site_admin_manages_only_their_own_sites_clinicians(tmp_path: Path) -> None:
    async with run_server(write_config(tmp_path)) as server, \
            aiohttp.ClientSession() as session:
        admin = Api(server, session, "admin")
        await admin.ok("POST", "/api/directory/clinicians", {
            "id": "sa-d1", "name": "Quản trị District One", "site": "d1",
            "roles": ["site_admin"]})
        sa = Api(server, session, "sa-d1")
        made = await sa.ok("POST", "/api/directory/clinicians", {
            "id": "bs-new", "name": "BS. Mới", "site": "d1", "roles": ["referring"]})
        assert made["clinician"]["site_id"] == "d1"
        await sa.ok("PATCH", "/api/directory/clinicians/bs-new", {"roles": ["specialist"],
                                                                  "specialties": ["cardiology"]})
        await sa.ok("POST", "/api/directory/clinicians/ref1/deactivate")
        listed = await sa.ok("GET", "/api/directory/clinicians")
        assert {c["site_id"] for c in listed["clinicians"]} == {"d1"}
        assert {c["id"] for c in listed["clinicians"]} == {"ref1", "distspec", "sa-d1", "bs-new"}
        await sa.refused("GET", "/api/directory/clinicians", None, 403, "forbidden",
                         params={"site": "c1"})
        await sa.refused("POST", "/api/directory/clinicians", {
            "id": "bs-x", "name": "X", "site": "d2", "roles": ["referring"]}, 403, "forbidden")
        for role in ("coordinator", "admin", "site_admin"):
            await sa.refused("POST", "/api/directory/clinicians", {
                "id": "bs-y", "name": "Y", "site": "d1", "roles": ["referring", role]},
                403, "role_not_grantable")
            await sa.refused("PATCH", "/api/directory/clinicians/bs-new", {"roles": [role]},
                             403, "role_not_grantable")
        await sa.refused("PATCH", "/api/directory/clinicians/bs-new", {"site": "d2"},
                         403, "forbidden")
        # Another site's clinicians are out of sight; their own site's admin out of reach.
        await sa.refused("POST", "/api/directory/clinicians/ref2/deactivate", None, 404,
                         "not_found")
        await sa.refused("PATCH", "/api/directory/clinicians/coord", {"name": "Z"}, 404,
                         "not_found")
        await sa.refused("POST", "/api/directory/clinicians/sa-d1/deactivate", None, 403,
                         "role_not_grantable")
        await sa.refused("POST", "/api/directory/sites", {
            "id": "s-x", "name": "X", "tier": "commune", "region": "01"}, 403, "forbidden")
        await sa.refused("POST", "/api/directory/sites/d1/deactivate", None, 403, "forbidden")
        for who in ("coord", "cardio1", "ref2"):
            other = Api(server, session, who)
            await other.refused("GET", "/api/directory/clinicians", None, 403, "forbidden")
            await other.refused("GET", "/api/directory/sites", None, 403, "forbidden")
            await other.refused("POST", "/api/directory/clinicians/ref3/deactivate", None, 403,
                                "forbidden")
        assert server.tokens.issue("ref2")  # untouched


async def test_bad_input_is_refused_clearly_and_changes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    async with run_server(config) as server, aiohttp.ClientSession() as session:
        admin = Api(server, session, "admin")
        before = await admin.ok("GET", "/api/directory/clinicians", params={"per_page": "500"})
        base = "/api/directory/clinicians"
        good = {"id": "bs-ok", "name": "BS. Ổn", "site": "d1", "roles": ["referring"]}
        message = await admin.refused("POST", base, {**good, "id": "ref1"}, 409, "duplicate_id")
        assert "ref1" in message
        await admin.refused("POST", "/api/directory/sites", {
            "id": "c1", "name": "X", "tier": "central", "region": "01"}, 409, "duplicate_id")
        message = await admin.refused("POST", base, {**good, "site": "nowhere"}, 422,
                                      "unknown_site")
        assert "nowhere" in message
        await admin.refused("PATCH", f"{base}/ref1", {"site": "nowhere"}, 422, "unknown_site")
        for bad in ({**good, "roles": ["surgeon"]}, {**good, "roles": []},
                    {**good, "id": "bad id!"}, {**good, "extra": 1}, {"id": "x"}, [good],
                    {**good, "name": ""}):
            await admin.refused("POST", base, bad, 400, "invalid_payload")
        await admin.refused("POST", base, None, 400, "invalid_payload", raw="{not json")
        await admin.refused("PATCH", f"{base}/ref1", {"id": "renamed"}, 400, "invalid_payload")
        await admin.refused("PATCH", f"{base}/ref1", {}, 400, "invalid_payload")
        # An edit with one bad field applies none of its good ones.
        await admin.refused("PATCH", f"{base}/ref1", {"name": "New", "roles": ["x"]}, 400,
                            "invalid_payload")
        await admin.refused("PATCH", f"{base}/nobody", {"name": "N"}, 404, "not_found")
        await admin.refused("PATCH", "/api/directory/sites/c1", {"tier": "capital"}, 400,
                            "invalid_payload")
        await admin.refused("GET", base, None, 400, "invalid_payload",
                            params={"page": "0"})
        await admin.refused("GET", base, None, 400, "invalid_payload", params={"sort": "x"})
        after = await admin.ok("GET", base, params={"per_page": "500"})
        assert after == before
        async with session.get(server.url + "/healthz") as response:
            assert response.status == 200
    # Nothing reached the store either.
    store = SqliteRecordStore(server.settings.storage.data_dir / "records.sqlite3")
    await store.open()
    try:
        stored = await store.read_directory()
    finally:
        await store.close()
    assert stored.all_clinicians["ref1"].name == "Referring One"
    assert "bs-ok" not in stored.all_clinicians and len(stored.all_sites) == 6


async def test_a_clinician_moved_or_narrowed_is_signed_out_to_sign_in_again(
        tmp_path: Path) -> None:
    async with run_server(write_config(tmp_path)) as server, \
            aiohttp.ClientSession() as session:
        admin = Api(server, session, "admin")
        old = server.token("cardio1")
        cardio = await Client(server.url, old).connect()
        ref3 = await Client(server.url, server.token("ref3")).connect()
        try:
            # Widening grants takes nothing away: the connection stays.
            await admin.ok("PATCH", "/api/directory/clinicians/ref3",
                           {"roles": ["referring", "specialist"]})
            await admin.ok("PATCH", "/api/directory/clinicians/cardio1", {"site": "c2"})
            ended = await cardio.next("session:ended", timeout=1.0)
            assert ended["code"] == "clinician_changed"
            assert ref3.sio.connected and not ref3.drain("session:ended")
            status, body = await _me(server, old)
            assert (status, body["error"]["code"]) == (401, "site_mismatch")
            assert (await _me(server, server.token("cardio1")))[1]["site"]["id"] == "c2"
        finally:
            await cardio.close()
            await ref3.close()


async def test_a_store_from_before_keeps_its_mirrored_directory(tmp_path: Path) -> None:
    """A records file written when the directory was only mirrored there (no ``active``, no
    ``updated_at``, no ``regions``) becomes the directory as it is; the file is not read."""
    import sqlite3

    from signaling.store import open_directory

    path = tmp_path / "records.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE sites (id TEXT PRIMARY KEY, name TEXT NOT NULL, tier TEXT NOT NULL, "
        "region TEXT NOT NULL);"
        "CREATE TABLE clinicians (id TEXT PRIMARY KEY, name TEXT NOT NULL, site_id TEXT NOT "
        "NULL, roles TEXT NOT NULL, specialties TEXT NOT NULL);"
        "INSERT INTO sites VALUES ('d1', 'District One', 'district', '11');"
        "INSERT INTO clinicians VALUES ('ref1', 'Referring One', 'd1', '[\"referring\"]', "
        "'[]');")
    db.commit()
    db.close()

    def seed() -> Any:
        raise AssertionError("a store with a directory is not seeded")

    directory = open_directory(path, seed)
    assert directory.clinician("ref1") is not None and directory.site("d1") is not None
    assert directory.all_clinicians["ref1"].active and directory.regions == {}


async def test_records_still_name_a_clinician_deactivated_since(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    async with run_server(config) as server, aiohttp.ClientSession() as session:
        tokens = {n: server.token(n) for n in ("ref1", "cardio1")}
        async with clients(server.url, tokens) as c:
            asked = await c["ref1"].ok("consult:request", {
                "specialty": "cardiology", "priority": "urgent", "reason": "test",
                "patient_pseudonym": "P-1"})
            accepted = await c["cardio1"].ok("consult:accept",
                                             {"request_id": asked["request"]["id"]})
            cid = accepted["consultation"]["id"]
            await c["ref1"].ok("consult:join", {"consultation_id": cid})
            await c["cardio1"].ok("consult:join", {"consultation_id": cid})
            await Api(server, session, "admin").ok(
                "POST", "/api/directory/clinicians/ref1/deactivate", {})
            # The participant list the others see and the archive's description keep the
            # name of who took part.
            record = await c["cardio1"].ok("consult:join", {"consultation_id": cid})
            names = {p["clinician_id"]: p["name"] for p in record["participants"]}
            assert names.get("ref1") not in (None, "ref1"), names
        assert server.app is not None
        services = server.app[SERVICES]
        described = await ArchiveDescription(store=services.store,
                                             directory=services.directory).describe(cid)
        assert described is not None
        assert "ref1" in {c["id"] for c in described.clinicians}
