"""The records' store (``signaling.store.RecordStore``): one contract, run against both backends,
the SQLite file and a real PostgreSQL (tests/postgres_server.py). What the services rely on:
every write there for the next reader (and after a reopen), the claim won exactly once (also by
two store instances, as two processes would be), conditional finishes and escalations, a
transaction that fails leaving nothing behind, timestamps kept to the last bit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from signaling.directory import Directory
from signaling.errors import AlreadyTaken, InvalidState, NotFound
from signaling.models import (
    ChatMessage,
    Clinician,
    Consultation,
    ConsultRequest,
    Minutes,
    Site,
)
from signaling.store import RecordStore, SqliteRecordStore
from signaling.store_pg import PostgresRecordStore
from tests.postgres_server import (
    create_database,
    restart_postgres,
    start_postgres,
    stop_postgres,
)

BACKENDS = ["sqlite", "postgresql"]
RACERS = 20

StoreFactory = Callable[[], RecordStore]
"""A new, not yet opened, store instance on the test's one database."""


@pytest.fixture(params=BACKENDS)
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    if request.param == "postgresql":
        dsn: str = request.getfixturevalue("postgres_dsn")
        return lambda: PostgresRecordStore(dsn, pool_size=4)
    path = tmp_path / "records.sqlite3"
    return lambda: SqliteRecordStore(path)


@pytest.fixture
async def store(new_store: StoreFactory) -> AsyncIterator[RecordStore]:
    opened = new_store()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def a_request(rid: str, *, requester: str = "ref1", created_at: float | None = None,
              priority: str = "urgent") -> ConsultRequest:
    return ConsultRequest(
        id=rid, site_id="d1", requester_id=requester, specialty="cardiology",
        priority=priority,  # type: ignore[arg-type]
        reason="chest pain, ECG attached", patient_pseudonym="P-7", status="waiting",
        created_at=time.time() if created_at is None else created_at)


def a_consultation(cid: str, rid: str, *, host: str = "cardio1",
                   clinicians: tuple[str, ...] = ("ref1", "cardio1"),
                   created_at: float | None = None) -> Consultation:
    return Consultation(
        id=cid, request_id=rid, host_id=host, relay_id="relay-1", state="open",
        created_at=time.time() if created_at is None else created_at,
        site_ids=["d1", "c1"], clinician_ids=list(clinicians))


async def test_the_directory_is_written_all_or_nothing_and_read_back(
        store: RecordStore) -> None:
    assert not (await store.read_directory()).all_sites
    sites = [Site("c1", "Bệnh viện Bạch Mai", "central", "01", True, 1.5),
             Site("d1", "Trung tâm Y tế Điện Biên", "district", "11", False, 2.25)]
    clinicians = [Clinician("cardio1", "BS. Nguyễn Thị Hương", "c1",
                            frozenset({"specialist", "admin"}), frozenset({"cardiology"}),
                            True, 3.125),
                  Clinician("ref1", "BS. Trần Văn Đức", "d1", frozenset({"referring"}),
                            frozenset(), False, 4.0)]
    await store.save_directory(sites, clinicians, {"01": "Hà Nội", "11": "Điện Biên"})
    directory = await store.read_directory()
    assert list(directory.all_sites.values()) == [
        Site("c1", "Bệnh viện Bạch Mai", "central", "01", True, 1.5),
        Site("d1", "Trung tâm Y tế Điện Biên", "district", "11", False, 2.25)]
    assert directory.all_clinicians["cardio1"] == clinicians[0]
    assert directory.all_clinicians["ref1"] == clinicians[1]
    assert directory.regions == {"01": "Hà Nội", "11": "Điện Biên"}
    assert directory.clinician("ref1") is None  # inactive: out of every lookup
    # Saving again replaces by id.
    await store.save_directory([Site("d1", "TTYT Điện Biên", "district", "11", True, 5.0)],
                               regions={"11": "Tỉnh Điện Biên"})
    directory = await store.read_directory()
    assert directory.all_sites["d1"].name == "TTYT Điện Biên" and directory.all_sites["d1"].active
    assert directory.regions["11"] == "Tỉnh Điện Biên" and len(directory.all_clinicians) == 2
    # A batch with one bad row writes none of its rows (here a name that may not be NULL).
    bad = Clinician("x1", None, "c1", frozenset(), frozenset())  # type: ignore[arg-type]
    with pytest.raises(Exception):  # noqa: B017 - sqlite3 and asyncpg say it each their way
        await store.save_directory([Site("n1", "New", "commune", "56")], [bad])
    directory = await store.read_directory()
    assert "n1" not in directory.all_sites and "x1" not in directory.all_clinicians


async def test_requests_are_kept_exactly_and_listed(store: RecordStore) -> None:
    now = time.time()  # a float with every bit in use: kept exactly (not PostgreSQL's REAL)
    first, second = a_request("r1", created_at=now), a_request("r2", created_at=now + 1)
    other = a_request("r3", requester="ref2", created_at=now + 2)
    for request in (first, second, other):
        await store.add_request(request)
    assert await store.get_request("r1") == first
    assert await store.get_request("nope") is None
    assert sorted(r.id for r in await store.waiting_requests()) == ["r1", "r2", "r3"]
    assert [r.id for r in await store.requests_of("ref1")] == ["r2", "r1"]
    assert [r.id for r in await store.requests_of("ref1", limit=1)] == ["r2"]
    with pytest.raises(Exception):  # noqa: B017 - a duplicate id
        await store.add_request(a_request("r1"))


async def test_finish_and_escalate_happen_once(store: RecordStore) -> None:
    await store.add_request(a_request("r1"))
    assert await store.mark_escalated("r1", 10.5) is True
    assert await store.mark_escalated("r1", 11.0) is False  # another node's timer, later
    assert (await store.get_request("r1")).escalated_at == 10.5  # type: ignore[union-attr]
    assert await store.mark_escalated("nope", 11.0) is False
    assert await store.finish_request("r1", "cancelled", 12.0) is True
    assert await store.finish_request("r1", "expired", 13.0) is False
    finished = await store.get_request("r1")
    assert finished is not None
    assert (finished.status, finished.closed_at) == ("cancelled", 12.0)
    assert await store.waiting_requests() == []
    assert await store.finish_request("nope", "expired", 13.0) is False


async def test_claim_wins_once_and_says_why_it_lost(store: RecordStore) -> None:
    await store.add_request(a_request("r1"))
    consultation = a_consultation("con1", "r1")
    await store.claim("r1", "cardio1", consultation, 20.0)
    claimed = await store.get_request("r1")
    assert claimed is not None
    assert (claimed.status, claimed.accepted_by, claimed.accepted_at,
            claimed.consultation_id) == ("accepted", "cardio1", 20.0, "con1")
    assert await store.get_consultation("con1") == consultation
    with pytest.raises(AlreadyTaken):
        await store.claim("r1", "cardio2", a_consultation("con2", "r1"), 21.0)
    assert await store.get_consultation("con2") is None
    with pytest.raises(NotFound):
        await store.claim("nope", "cardio2", a_consultation("con3", "nope"), 21.0)
    await store.add_request(a_request("r2"))
    await store.finish_request("r2", "cancelled", 22.0)
    with pytest.raises(InvalidState):
        await store.claim("r2", "cardio2", a_consultation("con4", "r2"), 23.0)
    # A claim whose consultation cannot be written (its id is taken) accepts nothing.
    await store.add_request(a_request("r3"))
    with pytest.raises(Exception):  # noqa: B017 - the duplicate consultation id
        await store.claim("r3", "cardio2", a_consultation("con1", "r3"), 24.0)
    assert (await store.get_request("r3")).status == "waiting"  # type: ignore[union-attr]


async def test_two_store_instances_racing_one_claim_have_one_winner(
        new_store: StoreFactory) -> None:
    """Two instances on one database, as two `serve` processes are: each its own pool (or
    SQLite connection); RACERS claims at once, spread over both."""
    stores = [new_store(), new_store()]
    for s in stores:
        await s.open()
    try:
        await stores[0].add_request(a_request("r1"))
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(
            stores[i % 2].claim("r1", f"racer{i}", a_consultation(f"con{i}", "r1",
                                                                  host=f"racer{i}"), 30.0 + i)
            for i in range(RACERS)), return_exceptions=True)
        took = time.perf_counter() - started
        winners = [i for i, o in enumerate(outcomes) if o is None]
        losers = [o for o in outcomes if isinstance(o, AlreadyTaken)]
        print(f"claim race: {RACERS} claims on 2 store instances in {took * 1000:.0f} ms: "
              f"{len(winners)} won, {len(losers)} AlreadyTaken")
        assert len(winners) == 1 and len(losers) == RACERS - 1, outcomes
        winner = winners[0]
        for s in stores:
            request = await s.get_request("r1")
            assert request is not None and request.accepted_by == f"racer{winner}"
            assert [c.id for c in await s.active_consultations()] == [f"con{winner}"]
    finally:
        for s in stores:
            await s.close()


async def test_consultations_are_saved_found_and_ended_once(store: RecordStore) -> None:
    for i, (rid, clinicians) in enumerate([("r1", ("ref1", "cardio1")),
                                           ("r2", ("ref2", "cardio2")),
                                           ("r3", ("ref3", "cardio1"))]):
        await store.add_request(a_request(rid, requester=clinicians[0]))
        await store.claim(rid, clinicians[1],
                          a_consultation(f"con{i + 1}", rid, host=clinicians[1],
                                         clinicians=clinicians, created_at=100.0 + i), 100.0)
    con2 = await store.get_consultation("con2")
    assert con2 is not None
    con2.state, con2.started_at, con2.relay_id = "live", 101.5, "relay-2"
    con2.site_ids.append("d3")
    con2.invited_site_ids.append("d3")
    await store.save_consultation(con2)
    assert await store.get_consultation("con2") == con2
    assert await store.get_consultation("nope") is None

    async def found(clinician: str, site: str, everything: bool = False,
                    limit: int = 100) -> list[str]:
        return [c.id for c in await store.consultations_for(
            clinician, site, everything=everything, limit=limit)]

    assert await found("cardio1", "c1") == ["con3", "con1"]  # newest first
    assert await found("ref3", "d3") == ["con3", "con2"]  # named, or the site invited
    assert await found("nobody", "k1") == []
    assert await found("coord", "c1", everything=True) == ["con3", "con2", "con1"]
    assert await found("coord", "c1", everything=True, limit=2) == ["con3", "con2"]

    await store.record_join("con2", "cardio2", "c2", 102.0)
    await store.record_join("con2", "ref2", "d2", 102.5)
    await store.record_leave("con2", "ref2", 103.0)
    await store.record_join("con2", "ref2", "d2", 104.0)
    minutes = Minutes("Nhồi máu cơ tim: chuyển tuyến", "cardio2", 110.0)
    await store.end_consultation(con2, minutes)
    ended = await store.get_consultation("con2")
    assert ended is not None
    assert (ended.state, ended.ended_at, ended.minutes) == ("ended", 110.0, minutes)
    request = await store.get_request("r2")
    assert request is not None and (request.status, request.closed_at) == ("closed", 110.0)
    assert await store.attendance_of("con2") == [
        {"clinician_id": "cardio2", "site_id": "c2", "joined_at": 102.0, "left_at": 110.0},
        {"clinician_id": "ref2", "site_id": "d2", "joined_at": 102.5, "left_at": 103.0},
        {"clinician_id": "ref2", "site_id": "d2", "joined_at": 104.0, "left_at": 110.0}]
    assert await store.attendees_of("con2") == {"cardio2", "ref2"}
    assert await store.attendees_of("con1") == frozenset()
    with pytest.raises(InvalidState):
        await store.end_consultation(con2, Minutes("again", "cardio2", 120.0))
    # An older copy saved by a process that missed the end does not bring it back.
    con2.relay_id = "relay-3"
    await store.save_consultation(con2)
    ended = await store.get_consultation("con2")
    assert ended is not None
    assert (ended.state, ended.relay_id, ended.minutes) == ("ended", "relay-2", minutes)
    assert sorted(c.id for c in await store.active_consultations()) == ["con1", "con3"]


async def test_chat_in_order(store: RecordStore) -> None:
    messages = [ChatMessage("m2", "con1", "cardio1", "c1", "Xin chào", 5.0),
                ChatMessage("m1", "con1", "ref1", "d1", "ECG đã gửi", 5.0),
                ChatMessage("m0", "con1", "ref1", "d1", "first", 4.0),
                ChatMessage("x1", "con9", "ref1", "d1", "elsewhere", 1.0)]
    for message in messages:
        await store.add_chat(message)
    # By time, then by id (byte order on both backends, whatever the database's locale).
    assert [m.id for m in await store.chat_of("con1")] == ["m0", "m1", "m2"]
    assert (await store.chat_of("con1"))[1] == messages[1]
    assert await store.chat_of("nope") == []


async def test_everything_is_there_after_a_reopen(new_store: StoreFactory) -> None:
    first = new_store()
    await first.open()
    await first.save_directory([Site("d1", "District One", "district", "11")])
    await first.add_request(a_request("r1", created_at=1.25))
    await first.add_request(a_request("r2", created_at=2.5))
    await first.claim("r2", "cardio1", a_consultation("con1", "r2"), 3.0)
    await first.add_chat(ChatMessage("m1", "con1", "ref1", "d1", "hello", 4.0))
    await first.close()
    await first.close()  # idempotent
    second = new_store()
    await second.open()
    try:
        assert [r.id for r in await second.waiting_requests()] == ["r1"]
        assert (await second.get_request("r1")).created_at == 1.25  # type: ignore[union-attr]
        assert [c.id for c in await second.active_consultations()] == ["con1"]
        assert [m.text for m in await second.chat_of("con1")] == ["hello"]
        assert isinstance(await second.read_directory(), Directory)
        assert "d1" in (await second.read_directory()).all_sites
    finally:
        await second.close()


async def test_a_closed_store_refuses_work(new_store: StoreFactory) -> None:
    store = new_store()
    await store.open()
    await store.close()
    with pytest.raises(RuntimeError):
        await store.get_request("r1")


async def test_the_postgresql_store_carries_on_after_the_server_restarts(
        tmp_path: Path) -> None:
    """A PostgreSQL of its own (the session's is shared): restarted under an open store, the
    store goes on (the pool replaces the connections the restart cut); while the server is
    down a call fails at once instead of hanging, and once it is back the records are all
    there."""
    server = start_postgres()
    try:
        store = PostgresRecordStore(create_database(server, "restart"), pool_size=4,
                                    timeout_s=5.0)
        await store.open()
        try:
            await asyncio.gather(*(store.add_request(a_request(f"r{i}")) for i in range(8)))
            await asyncio.to_thread(restart_postgres, server)
            for i in range(8):  # more calls than connections: every one of them was cut
                assert len(await store.waiting_requests()) == 8, i
            await asyncio.to_thread(stop_postgres, server, remove=False)
            started = time.monotonic()
            with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                await store.add_request(a_request("lost"))
            failed_after = time.monotonic() - started
            await asyncio.to_thread(restart_postgres, server)
            await store.add_request(a_request("r8"))
            assert len(await store.waiting_requests()) == 9
            assert await store.get_request("lost") is None
            print(f"PostgreSQL down: a call failed after {failed_after:.2f} s")
            assert failed_after < 5.0
        finally:
            await store.close()
    finally:
        stop_postgres(server)
