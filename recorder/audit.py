"""The archive's access log: ``<archive>/audit.log``, append-only and hash-chained.

One JSON object a line::

    {"seq": 7, "at": 1767225600.123, "actor": "cli", "action": "archive.export",
     "consultation_id": "c-42", "detail": {...}, "prev": "<hash of line 6>", "hash": "..."}

``hash`` is the SHA-256 (hex) of ``prev`` followed by the canonical JSON of the entry without
``hash`` (sorted keys, no spaces, UTF-8); the first entry's ``prev`` is 64 zeros. Editing,
removing or reordering a line breaks the chain and :meth:`AuditLog.verify` names the line.
(Cutting lines off the end cannot be seen from the file alone.)

The server and the CLI append to the same file: every append holds an exclusive ``flock`` while
it reads the last entry (from the end of the file) and writes and fsyncs its own line.

No patient data goes in: callers pass ids, action names and file names only.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recorder.manifest import fsync_dir

logger = logging.getLogger(__name__)

AUDIT_LOG = "audit.log"
GENESIS = "0" * 64
KEYS = frozenset({"seq", "at", "actor", "action", "consultation_id", "detail", "prev", "hash"})
_TAIL_BLOCK = 4096


Item = tuple[str, str, "str | None", "dict[str, Any] | None"]
"""An entry to append: actor, action, consultation id, detail."""


def _check(actor: str, action: str) -> None:
    if not actor or not action:
        raise ValueError(f"an audit entry needs an actor and an action: {actor!r}, {action!r}")


def canonical(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(entry: dict[str, Any]) -> str:
    """The hash an entry must carry: over its ``prev`` and every field but ``hash``."""
    body = {key: value for key, value in entry.items() if key != "hash"}
    return hashlib.sha256((str(entry.get("prev")) + canonical(body)).encode("utf-8")).hexdigest()


class AuditLog:
    """The hash-chained log at ``path`` (normally ``<archive>/audit.log``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._queued: list[tuple[Item, asyncio.Future[dict[str, Any]]]] = []
        self._writer: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"AuditLog({self.path})"

    def append(self, actor: str, action: str, consultation_id: str | None,
               detail: dict[str, Any] | None = None) -> dict[str, Any]:
        """Append one entry and return it (with its ``seq``, ``prev`` and ``hash``).

        Safe between processes; the line is on disk (fsync'ed) when this returns.
        """
        return self.append_many([(actor, action, consultation_id, detail)])[0]

    def append_many(self, items: list[Item]) -> list[dict[str, Any]]:
        """Append entries in order under one lock and one fsync (a group commit); each is on
        disk when this returns."""
        for actor, action, _, _ in items:
            _check(actor, action)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        entries: list[dict[str, Any]] = []
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                last, torn = _last_entry(fd)
                lines = []
                for actor, action, consultation_id, detail in items:
                    entry: dict[str, Any] = {
                        "seq": last["seq"] + 1 if last else 1,
                        "at": round(time.time(), 3),
                        "actor": actor,
                        "action": action,
                        "consultation_id": consultation_id,
                        "detail": detail,
                        "prev": last["hash"] if last else GENESIS,
                    }
                    entry["hash"] = entry_hash(entry)
                    lines.append(canonical(entry) + "\n")
                    entries.append(entry)
                    last = entry
                text = "".join(lines)
                if torn:
                    # A writer died mid-line: end that fragment so ours stays a line of its own
                    # (verify reports the fragment).
                    text = "\n" + text
                _write_all(fd, text.encode("utf-8"))
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)
        return entries

    async def append_async(self, actor: str, action: str, consultation_id: str | None,
                           detail: dict[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`append` for asyncio code: the lock and fsync run in a worker thread, and
        entries that arrive while one write is under way go together in the next (one fsync
        for the lot: sign-ins, directory changes and recordings audited at once need not
        queue a disk flush each). In order of the calls; on disk when this returns."""
        _check(actor, action)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queued.append(((actor, action, consultation_id, detail), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_queued())
        return await future

    async def _write_queued(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                entries = await asyncio.to_thread(self.append_many, [item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), entry in zip(batch, entries, strict=True):
                if not future.done():
                    future.set_result(entry)

    def entries(self, consultation_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Every well-formed entry in order, or only those about ``consultation_id``."""
        for _, entry, _ in self._lines():
            if entry is None:
                continue
            if consultation_id is None or entry.get("consultation_id") == consultation_id:
                yield entry

    def verify(self) -> list[str]:
        """Every problem in the chain, naming the line (1-based); empty when it is intact."""
        problems: list[str] = []
        prev_hash = GENESIS
        prev_seq = 0
        prev_line = 0
        for number, entry, error in self._lines():
            if entry is None:
                problems.append(f"line {number}: {error}")
                continue
            if entry_hash(entry) != entry.get("hash"):
                problems.append(f"line {number}: hash does not match its content (edited)")
            if entry.get("prev") != prev_hash:
                after = f"line {prev_line}" if prev_line else "the start of the log"
                problems.append(f"line {number}: chain broken: prev is not the hash of {after} "
                                "(a line was removed, reordered, inserted or rewritten)")
            if entry.get("seq") != prev_seq + 1:
                problems.append(f"line {number}: seq {entry.get('seq')!r}, expected "
                                f"{prev_seq + 1}")
            prev_hash = str(entry.get("hash"))
            seq = entry.get("seq")
            prev_seq = seq if isinstance(seq, int) else prev_seq + 1
            prev_line = number
        return problems

    def _lines(self) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
        """(line number, entry or None, what is wrong with it) for every line present when
        this started (a line being appended meanwhile is not read half-written)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            try:
                size = os.fstat(f.fileno()).st_size
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            number = 0
            read = 0
            while read < size:
                raw = f.readline(size - read)
                if not raw:
                    break
                read += len(raw)
                number += 1
                if not raw.endswith(b"\n"):
                    yield number, None, "incomplete line (no newline at the end)"
                    continue
                entry, error = _parse(raw[:-1])
                yield number, entry, error


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"not JSON ({exc})"
    if not isinstance(entry, dict):
        return None, f"not a JSON object: {type(entry).__name__}"
    if set(entry) != KEYS:
        missing = sorted(KEYS - set(entry))
        extra = sorted(set(entry) - KEYS)
        return None, f"not an audit entry (missing {missing}, unexpected {extra})"
    return entry, ""


def _last_entry(fd: int) -> tuple[dict[str, Any] | None, bool]:
    """The last well-formed entry, read backwards from the end of the file, and whether the
    file ends in a torn (unterminated) line."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None, False
    torn = os.pread(fd, 1, size - 1) != b"\n"
    pos = size
    buf = b""  # the bytes from pos to the end (or to the start of lines already read)
    while pos > 0:
        start = max(0, pos - _TAIL_BLOCK)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        pieces = buf.split(b"\n")
        if len(pieces) == 1 and pos > 0:
            continue  # no line boundary yet: a long line, read on
        # pieces[0] is cut off unless this is the start of the file; pieces[-1] is the torn
        # fragment after the last newline (or b"").
        for raw in reversed(pieces[1:-1] if pos > 0 else pieces[:-1]):
            entry, _ = _parse(raw)
            if entry is not None and isinstance(entry["seq"], int) \
                    and isinstance(entry["hash"], str):
                return entry, torn
        buf = pieces[0] + b"\n"
    logger.warning("audit log has no well-formed entry; starting a new chain")
    return None, torn


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]

