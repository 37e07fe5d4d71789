"""recorder/audit.py: the hash-chained, append-only access log."""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from recorder import audit as audit_module
from recorder.audit import GENESIS, AuditLog, entry_hash

PER_PROCESS = 200


def filled(tmp_path: Path, count: int = 4) -> AuditLog:
    log = AuditLog(tmp_path / "audit.log")
    for n in range(count):
        log.append("cli", "archive.export", f"c-{n}", {"out": f"c-{n}.webm"})
    return log


def lines(log: AuditLog) -> list[str]:
    return log.path.read_text(encoding="utf-8").splitlines(keepends=True)


def rewrite(log: AuditLog, new_lines: list[str]) -> None:
    log.path.write_text("".join(new_lines), encoding="utf-8")


def test_entries_chain_from_64_zeros_and_verify(tmp_path: Path) -> None:
    log = filled(tmp_path)
    entries = list(log.entries())
    assert [e["seq"] for e in entries] == [1, 2, 3, 4]
    assert entries[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(entries):
        assert after["prev"] == before["hash"]
    for entry in entries:
        assert entry["hash"] == entry_hash(entry)
        assert set(entry) == {"seq", "at", "actor", "action", "consultation_id", "detail",
                              "prev", "hash"}
    assert log.verify() == []
    assert [e["seq"] for e in log.entries("c-2")] == [3]


def test_append_returns_the_entry_it_wrote(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "sub" / "audit.log")
    entry = log.append("server", "recording.start", None, {"files": ["ü.webm"]})
    assert json.loads(log.path.read_text(encoding="utf-8")) == entry
    assert "ü.webm" in log.path.read_text(encoding="utf-8")  # ensure_ascii=False
    with pytest.raises(ValueError, match="actor"):
        log.append("", "x", None)


def test_a_missing_log_verifies_empty(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    assert log.verify() == []
    assert list(log.entries()) == []


def test_an_edited_line_is_named(tmp_path: Path) -> None:
    log = filled(tmp_path)
    text = lines(log)
    entry = json.loads(text[1])
    entry["consultation_id"] = "someone-else"
    text[1] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    rewrite(log, text)
    assert log.verify() == ["line 2: hash does not match its content (edited)"]


def test_an_edited_line_with_its_hash_recomputed_breaks_the_chain_at_the_next(
    tmp_path: Path,
) -> None:
    log = filled(tmp_path)
    text = lines(log)
    entry = json.loads(text[1])
    entry["action"] = "archive.verify"
    entry["hash"] = entry_hash(entry)
    text[1] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    rewrite(log, text)
    problems = log.verify()
    assert len(problems) == 1 and problems[0].startswith("line 3: chain broken")


def test_a_deleted_line_is_caught(tmp_path: Path) -> None:
    log = filled(tmp_path)
    text = lines(log)
    del text[1]
    rewrite(log, text)
    problems = log.verify()
    assert any(p.startswith("line 2: chain broken") for p in problems)
    assert "line 2: seq 3, expected 2" in problems


def test_reordered_lines_are_caught(tmp_path: Path) -> None:
    log = filled(tmp_path)
    text = lines(log)
    text[1], text[2] = text[2], text[1]
    rewrite(log, text)
    problems = log.verify()
    assert any(p.startswith("line 2: chain broken") for p in problems)
    assert any(p.startswith("line 3: chain broken") for p in problems)
    assert "line 2: seq 3, expected 2" in problems


def test_a_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    log = filled(tmp_path)
    text = lines(log)
    text.insert(2, "garbage\n")
    rewrite(log, text)
    problems = log.verify()
    assert len(problems) == 1 and problems[0].startswith("line 3: not JSON")


def test_a_torn_last_line_is_reported_and_appends_continue_the_chain(tmp_path: Path) -> None:
    log = filled(tmp_path, 2)
    with open(log.path, "a", encoding="utf-8") as f:
        f.write('{"seq":3,"at":')  # a writer died mid-line
    entry = log.append("cli", "archive.prune", "c-9")
    assert entry["seq"] == 3
    assert entry["prev"] == list(log.entries())[1]["hash"]
    problems = log.verify()
    assert len(problems) == 1 and problems[0].startswith("line 3: not JSON")
    assert [e["seq"] for e in log.entries()] == [1, 2, 3]


def test_append_reads_the_last_entry_from_the_end_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.path.write_bytes(b"x" * 100_000 + b"\n")  # the head is never parsed
    first = log.append("cli", "a", None)
    assert first["seq"] == 1  # no well-formed entry: a new chain
    monkeypatch.setattr(audit_module, "_TAIL_BLOCK", 64)  # entries span several blocks
    for _ in range(3):
        log.append("cli", "b", "c-1", {"files": ["a" * 100]})
    assert [e["seq"] for e in log.entries()] == [1, 2, 3, 4]
    assert log.verify() == ["line 1: not JSON (Expecting value: line 1 column 1 (char 0))"]


async def test_append_async_runs_in_a_thread(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    entry = await log.append_async("server", "recording.start", "c-1", {"files": []})
    assert entry["seq"] == 1
    assert log.verify() == []


def _append_many(path: str, actor: str, start: Any) -> None:
    start.wait(10)
    log = AuditLog(Path(path))
    for n in range(PER_PROCESS):
        log.append(actor, "archive.verify", f"c-{n}")


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_append_many, args=(str(path), actor, start))
               for actor in ("server", "cli")]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(30)
    assert [w.exitcode for w in workers] == [0, 0]
    log = AuditLog(path)
    assert log.verify() == []
    entries = list(log.entries())
    assert [e["seq"] for e in entries] == list(range(1, 2 * PER_PROCESS + 1))
    actors = [e["actor"] for e in entries]
    assert actors.count("server") == actors.count("cli") == PER_PROCESS


async def test_entries_appended_at_once_share_a_disk_flush_and_keep_their_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushes = 0
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal flushes
        flushes += 1
        real_fsync(fd)

    monkeypatch.setattr(audit_module.os, "fsync", counting_fsync)
    log = AuditLog(tmp_path / "audit.log")
    entries = await asyncio.gather(*(
        log.append_async("server", "auth.signin", None, {"n": n}) for n in range(50)))
    assert [e["detail"]["n"] for e in entries] == list(range(50))
    assert [e["seq"] for e in entries] == list(range(1, 51))
    assert log.verify() == []
    assert [e["detail"]["n"] for e in log.entries()] == list(range(50))
    # The first entry is written alone; the 49 that queued meanwhile go together.
    assert flushes <= 3, flushes
    with pytest.raises(ValueError):
        await log.append_async("", "x", None)
