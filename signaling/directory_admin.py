"""Administering the directory while the server runs: add, edit, deactivate and reactivate
sites and clinicians, name regions, import and export whole files, search across thousands.

Every change is checked by ``signaling.permissions``, validated with the directory's own
entries (``_SiteEntry``, ``_ClinicianEntry``), written to the store in one transaction, then put
in place in the in-memory ``Directory`` (so it takes effect at once), then audited in the
archive's hash-chained log (``recorder.audit``: who, what, when; ids and field names, never a
secret). A change is all or nothing: it is validated entirely before the store is touched, and
the memory follows only a committed transaction. Changes are serialized by one lock.

A clinician who can no longer sign in (deactivated, or their site deactivated) has their live
socket.io connections told ``session:ended`` ``{code: "clinician_inactive"}`` and closed before
the call returns; their token is refused from then on (the lookups no longer hold them). A
clinician moved to another site or losing a role or specialty is told ``session:ended``
``{code: "clinician_changed"}`` and closed too: their connections carry grants they no longer
have (a token for the old site is refused on the next sign-in: ``site_mismatch``).

Imports (CSV or the TOML directory file) upsert by id: a new id is created, a known one
replaced, an identical one left alone. Every bad row is reported with its line number.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import sys
import time
import tomllib
import unicodedata
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recorder.audit import AuditLog
from signaling import permissions
from signaling.directory import (
    Directory,
    _ClinicianEntry,
    _RegionEntry,
    _SiteEntry,
    clinician_of,
    describe,
    site_of,
)
from signaling.errors import Forbidden, InvalidPayload, NotFound, SignalingError
from signaling.fleet import Fleet
from signaling.models import Clinician, Site
from signaling.store import RecordStore
from signaling.tokens import Principal

logger = logging.getLogger(__name__)

SESSION_ENDED = "session:ended"
"""The event a connection gets just before the server closes it for a directory change."""
INACTIVE = "clinician_inactive"
CHANGED = "clinician_changed"

CSV_COLUMNS = ("kind", "id", "name", "site", "tier", "region", "roles", "specialties", "active")
"""The import and export format: one row per region, site or clinician; lists ``;``-separated."""
_COLUMNS_OF = {
    "region": {"id", "name"},
    "site": {"id", "name", "tier", "region", "active"},
    "clinician": {"id", "name", "site", "roles", "specialties", "active"},
}
_TRUE = {"", "1", "true", "yes", "y", "có", "co"}
_FALSE = {"0", "false", "no", "n", "không", "khong"}

TOML_TYPE = "application/toml"
"""The content type of a TOML directory file sent to ``POST /api/directory/import``."""
PER_PAGE = 50
MAX_PER_PAGE = 500


class DuplicateId(SignalingError):
    code = "duplicate_id"
    http_status = 409


class UnknownSite(SignalingError):
    code = "unknown_site"
    http_status = 422


class RoleNotGrantable(SignalingError):
    code = "role_not_grantable"
    http_status = 403


class ImportRefused(SignalingError):
    """An import with bad rows: nothing of it was applied; ``problems`` names every row."""

    code = "import_invalid"
    http_status = 422

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} bad rows; nothing was imported:\n" +
                         "\n".join(problems))
        self.problems = problems

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        wire["error"]["problems"] = self.problems
        return wire


class Sessions(Protocol):
    """The live connections of clinicians (``signaling.handlers.SocketGateway``)."""

    async def end_sessions(self, clinician_ids: Collection[str], code: str,
                           message: str) -> int: ...

    def online(self, clinician_id: str) -> bool: ...


def fold(text: str) -> str:
    """Search form: lower case without diacritics, so "nguyen" finds "Nguyễn" (đ has no
    decomposition in Unicode: it is mapped by hand)."""
    decomposed = unicodedata.normalize("NFD", text.casefold().replace("đ", "d"))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


# -- payloads -----------------------------------------------------------------------------------

_SITE_FIELDS = frozenset(_SiteEntry.model_fields) - {"id", "active"}
_CLINICIAN_FIELDS = frozenset(_ClinicianEntry.model_fields) - {"id", "active"}


def _entry(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise InvalidPayload(f"expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidPayload("; ".join(describe(exc))) from None


def _patched(model: type[BaseModel], current: dict[str, Any], patch: Any,
             allowed: frozenset[str]) -> Any:
    """``current`` with the fields of ``patch`` replaced, validated as a whole entry."""
    if not isinstance(patch, dict) or not patch:
        raise InvalidPayload("expected a JSON object with at least one field to change")
    unknown = sorted(set(patch) - allowed)
    if unknown:
        raise InvalidPayload(f"fields {unknown} cannot be changed here; editable: "
                             f"{sorted(allowed)} (deactivate and reactivate have their own "
                             "routes)")
    return _entry(model, {**current, **patch})


def _site_fields(site: Site) -> dict[str, Any]:
    return {"id": site.id, "name": site.name, "tier": site.tier, "region": site.region,
            "active": site.active}


def _clinician_fields(c: Clinician) -> dict[str, Any]:
    return {"id": c.id, "name": c.name, "site": c.site_id, "roles": sorted(c.roles),
            "specialties": sorted(c.specialties), "active": c.active}


def _changes(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in after.items() if before is None or before.get(k) != v}


# -- imports ------------------------------------------------------------------------------------


@dataclass
class Batch:
    """What an import file holds, row by row (``where``: "line 7" or "sites[3]")."""

    regions: list[tuple[str, _RegionEntry]] = field(default_factory=list)
    sites: list[tuple[str, _SiteEntry]] = field(default_factory=list)
    clinicians: list[tuple[str, _ClinicianEntry]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    rows: int = 0


@dataclass
class ImportReport:
    rows: int
    regions: int = 0
    sites_created: int = 0
    sites_updated: int = 0
    clinicians_created: int = 0
    clinicians_updated: int = 0
    unchanged: int = 0
    ended_sessions: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_wire(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        verb = "would create" if self.dry_run else "created"
        return (f"{self.rows} rows: {verb} {self.sites_created} sites and "
                f"{self.clinicians_created} clinicians, updated {self.sites_updated} sites and "
                f"{self.clinicians_updated} clinicians, {self.regions} regions, "
                f"{self.unchanged} unchanged, in {self.seconds:.2f} s")


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(";") if part.strip()]


def parse_csv(text: str) -> Batch:
    """Rows of a CSV export (``CSV_COLUMNS`` header on line 1). Each physical line is one row
    (names hold no line breaks), so a malformed line is reported and the next one read."""
    batch = Batch()
    lines = text.removeprefix("\ufeff").splitlines()
    if not lines or [c.strip() for c in next(csv.reader([lines[0]]), [])] != list(CSV_COLUMNS):
        batch.problems.append(f"line 1: the header must be {','.join(CSV_COLUMNS)}")
        return batch
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        batch.rows += 1
        where = f"line {number}"
        try:
            cells = next(csv.reader([line], strict=True))
        except csv.Error as exc:
            batch.problems.append(f"{where}: malformed CSV: {exc}")
            continue
        if len(cells) != len(CSV_COLUMNS):
            batch.problems.append(f"{where}: malformed CSV: {len(cells)} fields, expected "
                                  f"{len(CSV_COLUMNS)} ({','.join(CSV_COLUMNS)})")
            continue
        row = {k: v.strip() for k, v in zip(CSV_COLUMNS, cells, strict=True)}
        kind = row.pop("kind")
        if kind not in _COLUMNS_OF:
            batch.problems.append(f"{where}: kind {kind!r}: expected region, site or clinician")
            continue
        stray = sorted(k for k, v in row.items() if v and k not in _COLUMNS_OF[kind])
        if stray:
            batch.problems.append(f"{where}: a {kind} row leaves {', '.join(stray)} empty")
            continue
        data: dict[str, Any] = {k: v for k, v in row.items() if k in _COLUMNS_OF[kind]}
        if "active" in data:
            flag = data["active"].casefold()
            if flag not in _TRUE | _FALSE:
                batch.problems.append(f"{where}: active = {data['active']!r}: expected true "
                                      "or false")
                continue
            data["active"] = flag in _TRUE
        if kind == "clinician":
            data["roles"] = _split(data["roles"])
            data["specialties"] = _split(data["specialties"])
        _add(batch, kind, where, data)
    return batch


def parse_toml(text: str, source: str) -> Batch:
    """The entries of a TOML directory file, each validated on its own (``sites[3]``)."""
    batch = Batch()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        batch.problems.append(f"{source}: not valid TOML: {exc}")
        return batch
    extra = sorted(set(data) - {"sites", "clinicians", "regions"})
    if extra:
        batch.problems.append(f"{source}: unknown tables {extra}")
    for table, kind in (("regions", "region"), ("sites", "site"), ("clinicians", "clinician")):
        entries = data.get(table, [])
        if not isinstance(entries, list):
            batch.problems.append(f"{source}: {table} must be [[{table}]] tables")
            continue
        for index, entry in enumerate(entries):
            batch.rows += 1
            _add(batch, kind, f"{table}[{index}]", entry)
    return batch


def _add(batch: Batch, kind: str, where: str, data: Any) -> None:
    models: dict[str, type[BaseModel]] = {"region": _RegionEntry, "site": _SiteEntry,
                                          "clinician": _ClinicianEntry}
    model = models[kind]
    try:
        entry = model.model_validate(data)
    except ValidationError as exc:
        ident = data.get("id") if isinstance(data, dict) else None
        batch.problems.append(f"{where}: {kind} {ident!r}: " + "; ".join(describe(exc)))
        return
    if isinstance(entry, _RegionEntry):
        batch.regions.append((where, entry))
    elif isinstance(entry, _SiteEntry):
        batch.sites.append((where, entry))
    elif isinstance(entry, _ClinicianEntry):
        batch.clinicians.append((where, entry))


def read_import_file(path: Path) -> Batch:
    """A CSV (``.csv``) or TOML (anything else) directory file, UTF-8."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return Batch(problems=[f"{path}: cannot read it as UTF-8 text: {exc}"])
    if path.suffix.lower() == ".csv":
        return parse_csv(text)
    return parse_toml(text, str(path))


def export_csv(directory: Directory) -> str:
    """Every region, site and clinician (inactive ones too) in the import format."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for code, name in sorted(directory.regions.items()):
        writer.writerow(["region", code, name, "", "", "", "", "", ""])
    for s in sorted(directory.all_sites.values(), key=lambda s: s.id):
        writer.writerow(["site", s.id, s.name, "", s.tier, s.region, "", "",
                         "true" if s.active else "false"])
    for c in sorted(directory.all_clinicians.values(), key=lambda c: c.id):
        writer.writerow(["clinician", c.id, c.name, c.site_id, "", "", ";".join(sorted(c.roles)),
                         ";".join(sorted(c.specialties)), "true" if c.active else "false"])
    return out.getvalue()


DIRECTORY_CHANGED = "directory"
"""The fleet message of a directory change (the others read the store again)."""


# -- the service --------------------------------------------------------------------------------


class DirectoryAdmin:
    def __init__(self, directory: Directory, store: RecordStore, audit: AuditLog,
                 sessions: Sessions | None = None) -> None:
        self.directory = directory
        self._store = store
        self._audit = audit
        self._sessions = sessions
        self._folded: dict[str, tuple[object, str]] = {}
        self._lock = asyncio.Lock()
        self._fleet: Fleet | None = None

    # -- a fleet -----------------------------------------------------------------------------
    def join(self, fleet: Fleet) -> None:
        """Several `serve` processes: each change is told to the others (``directory`` on the
        bus), and theirs are read back from the shared store, here at once and at every
        resync (the bus may lose a message), so that a clinician deactivated on one node is
        signed out of every node and a new one can sign in anywhere, without a restart."""
        self._fleet = fleet
        fleet.subscribe(DIRECTORY_CHANGED, self._changed_elsewhere)
        fleet.on_resync(self._resync)

    async def _changed_elsewhere(self, _data: dict[str, Any]) -> None:
        await self.reload()

    async def _resync(self) -> None:
        await self.reload()

    async def reload(self) -> int:
        """Apply what the store holds and memory does not (another process changed it), then
        close this process's connections it affects; returns how many were closed."""
        async with self._lock:
            stored = await self._store.read_directory()
            known = self.directory
            sites = [s for s in stored.all_sites.values() if known.all_sites.get(s.id) != s]
            clinicians = [c for c in stored.all_clinicians.values()
                          if known.all_clinicians.get(c.id) != c]
            regions = {code: name for code, name in stored.regions.items()
                       if known.regions.get(code) != name}
            if not (sites or clinicians or regions):
                return 0
            before = {c.id: known.all_clinicians.get(c.id) for c in clinicians}
            gone = known.apply(sites, clinicians, regions)
            logger.info("directory: %d sites, %d clinicians and %d regions changed by another "
                        "process", len(sites), len(clinicians), len(regions))
            return await self._end_affected(gone, clinicians, before)

    # -- reading ---------------------------------------------------------------------------
    def site_wire(self, site: Site) -> dict[str, Any]:
        return {**site.to_wire(), "region_name": self.directory.region_name(site.region),
                "active": site.active, "updated_at": site.updated_at}

    def clinician_wire(self, c: Clinician) -> dict[str, Any]:
        site = self.directory.all_sites.get(c.site_id)
        return {**c.to_wire(), "active": c.active, "updated_at": c.updated_at,
                "site_name": site.name if site else None,
                "site_active": bool(site and site.active),
                "region": site.region if site else None,
                "region_name": self.directory.region_name(site.region) if site else None,
                "online": bool(self._sessions and self._sessions.online(c.id))}

    def _fold(self, record: Site | Clinician) -> str:
        key = f"{type(record).__name__}:{record.id}"
        cached = self._folded.get(key)
        if cached is not None and cached[0] is record:
            return cached[1]
        text = fold(f"{record.id} {record.name}")
        self._folded[key] = (record, text)
        return text

    def search_sites(self, actor: Principal, *, q: str = "", region: str | None = None,
                     active: bool | None = None, page: int = 1,
                     per_page: int = PER_PAGE) -> dict[str, Any]:
        _require(permissions.may_view_directory(actor), actor, "see the directory")
        needle = fold(q.strip())
        found = [s for s in self.directory.all_sites.values()
                 if (region is None or s.region == region)
                 and (active is None or s.active == active)
                 and (not needle or needle in self._fold(s)
                      or needle in fold(self.directory.region_name(s.region)))]
        found.sort(key=lambda s: (self._fold(s).partition(" ")[2], s.id))
        return _page([self.site_wire(s) for s in _slice(found, page, per_page)], len(found),
                     page, per_page, "sites")

    def search_clinicians(self, actor: Principal, *, q: str = "", site: str | None = None,
                          role: str | None = None, region: str | None = None,
                          active: bool | None = None, page: int = 1,
                          per_page: int = PER_PAGE) -> dict[str, Any]:
        _require(permissions.may_view_directory(actor), actor, "see the directory")
        if not permissions.sees_every_clinician(actor):
            if site is not None and site != actor.site.id:
                raise Forbidden(f"a site admin sees the clinicians of site {actor.site.id!r} "
                                f"only, not of {site!r}")
            site = actor.site.id
        needle = fold(q.strip())
        sites = self.directory.all_sites
        found = [c for c in self.directory.all_clinicians.values()
                 if (site is None or c.site_id == site)
                 and (role is None or role in c.roles)
                 and (region is None or sites[c.site_id].region == region)
                 and (active is None or c.active == active)
                 and (not needle or needle in self._fold(c))]
        found.sort(key=lambda c: (self._fold(c).partition(" ")[2], c.id))
        return _page([self.clinician_wire(c) for c in _slice(found, page, per_page)],
                     len(found), page, per_page, "clinicians")

    def regions(self) -> list[dict[str, str]]:
        return [{"id": k, "name": v} for k, v in sorted(self.directory.regions.items())]

    async def set_region(self, actor: Principal, code: str, data: Any) -> dict[str, str]:
        """Name (or rename) a province: ``{name}``; every site of it shows the name at once."""
        _require(permissions.may_manage_sites(actor), actor, "name regions")
        if not isinstance(data, dict):
            raise InvalidPayload(f"expected a JSON object, got {type(data).__name__}")
        entry: _RegionEntry = _entry(_RegionEntry, {**data, "id": code})
        async with self._lock:
            before = self.directory.regions.get(code)
            await self._commit(actor.id, "directory.region.set", regions={code: entry.name},
                               detail={"id": code, "changes": {"name": entry.name},
                                       "created": before is None})
        return {"id": code, "name": entry.name}

    # -- sites -----------------------------------------------------------------------------
    async def create_site(self, actor: Principal, data: Any) -> dict[str, Any]:
        _require(permissions.may_manage_sites(actor), actor, "add sites")
        entry: _SiteEntry = _entry(_SiteEntry, data)
        async with self._lock:
            if entry.id in self.directory.all_sites:
                raise DuplicateId(f"site id {entry.id!r} is taken")
            site = site_of(entry, time.time())
            await self._commit(actor.id, "directory.site.create", sites=[site],
                               detail={"id": site.id, "changes": _site_fields(site)})
        return self.site_wire(site)

    async def edit_site(self, actor: Principal, site_id: str, patch: Any) -> dict[str, Any]:
        _require(permissions.may_manage_sites(actor), actor, "edit sites")
        async with self._lock:
            current = self._site(site_id)
            before = _site_fields(current)
            entry: _SiteEntry = _patched(_SiteEntry, before, patch, _SITE_FIELDS)
            site = site_of(entry, time.time())
            await self._commit(actor.id, "directory.site.edit", sites=[site],
                               detail={"id": site_id,
                                       "changes": _changes(before, _site_fields(site))})
        return self.site_wire(site)

    async def set_site_active(self, actor: Principal, site_id: str,
                              active: bool) -> dict[str, Any]:
        verb = "reactivate" if active else "deactivate"
        _require(permissions.may_manage_sites(actor), actor, f"{verb} sites")
        async with self._lock:
            site = replace(self._site(site_id), active=active, updated_at=time.time())
            await self._commit(actor.id, f"directory.site.{verb}", sites=[site],
                               detail={"id": site_id})
        return self.site_wire(site)

    def _site(self, site_id: str) -> Site:
        site = self.directory.all_sites.get(site_id)
        if site is None:
            raise NotFound(f"no site {site_id!r} in the directory")
        return site

    # -- clinicians ------------------------------------------------------------------------
    async def create_clinician(self, actor: Principal, data: Any) -> dict[str, Any]:
        _require(permissions.may_view_directory(actor), actor, "add clinicians")
        entry: _ClinicianEntry = _entry(_ClinicianEntry, data)
        async with self._lock:
            self._check_target(actor, entry)
            if entry.id in self.directory.all_clinicians:
                raise DuplicateId(f"clinician id {entry.id!r} is taken")
            clinician = clinician_of(entry, time.time())
            await self._commit(actor.id, "directory.clinician.create", clinicians=[clinician],
                               detail={"id": clinician.id,
                                       "changes": _clinician_fields(clinician)})
        return self.clinician_wire(clinician)

    async def edit_clinician(self, actor: Principal, clinician_id: str,
                             patch: Any) -> dict[str, Any]:
        _require(permissions.may_view_directory(actor), actor, "edit clinicians")
        async with self._lock:
            current = self._clinician(actor, clinician_id)
            before = _clinician_fields(current)
            entry: _ClinicianEntry = _patched(_ClinicianEntry, before, patch, _CLINICIAN_FIELDS)
            self._check_target(actor, entry)
            clinician = clinician_of(entry, time.time())
            await self._commit(actor.id, "directory.clinician.edit", clinicians=[clinician],
                               detail={"id": clinician_id,
                                       "changes": _changes(before, _clinician_fields(clinician))})
        return self.clinician_wire(clinician)

    async def set_clinician_active(self, actor: Principal, clinician_id: str,
                                   active: bool) -> dict[str, Any]:
        verb = "reactivate" if active else "deactivate"
        _require(permissions.may_view_directory(actor), actor, f"{verb} clinicians")
        async with self._lock:
            current = self._clinician(actor, clinician_id)
            clinician = replace(current, active=active, updated_at=time.time())
            await self._commit(actor.id, f"directory.clinician.{verb}", clinicians=[clinician],
                               detail={"id": clinician_id})
        return self.clinician_wire(clinician)

    def _clinician(self, actor: Principal, clinician_id: str) -> Clinician:
        clinician = self.directory.all_clinicians.get(clinician_id)
        if clinician is None or not permissions.may_manage_clinician(actor, clinician):
            if clinician is not None and permissions.may_manage_clinicians_of(
                    actor, clinician.site_id):
                raise RoleNotGrantable(
                    f"clinician {clinician_id!r} holds roles "
                    f"{sorted(clinician.roles - permissions.grantable_roles(actor))} that "
                    f"{actor.id!r} may not grant, so may not change them either")
            if clinician is not None and permissions.sees_every_clinician(actor):
                raise Forbidden(f"{actor.id!r} may not change clinician {clinician_id!r}")
            # A site admin learns nothing of other sites' clinicians.
            raise NotFound(f"no clinician {clinician_id!r} at site {actor.site.id!r}"
                           if not permissions.sees_every_clinician(actor)
                           else f"no clinician {clinician_id!r} in the directory")
        return clinician

    def _check_target(self, actor: Principal, entry: _ClinicianEntry) -> None:
        """The clinician as they will be: on a known site the actor manages, with roles the
        actor may grant."""
        if entry.site not in self.directory.all_sites:
            raise UnknownSite(f"clinician {entry.id!r} names site {entry.site!r}, which is "
                              "not in the directory")
        if not permissions.may_manage_clinicians_of(actor, entry.site):
            raise Forbidden(f"{actor.id!r} manages the clinicians of site {actor.site.id!r} "
                            f"only, not of {entry.site!r}")
        refused = sorted(set(entry.roles) - permissions.grantable_roles(actor))
        if refused:
            raise RoleNotGrantable(f"{actor.id!r} may not grant the roles {refused}; "
                                   f"grantable: {sorted(permissions.grantable_roles(actor))}")

    # -- imports ---------------------------------------------------------------------------
    async def import_batch(self, actor: str, batch: Batch, *,
                           dry_run: bool) -> ImportReport:
        """Apply an import, all or nothing: ImportRefused (with every problem) if any row is
        bad, even on a dry run (which never changes anything). ``actor`` is a clinician id or
        ``cli:<user>``; the caller checked ``permissions.may_manage_sites``."""
        started = time.monotonic()
        async with self._lock:
            problems = list(batch.problems)
            seen: dict[tuple[str, str], str] = {}
            kinds: list[tuple[str, list[tuple[str, Any]]]] = [
                ("region", list(batch.regions)), ("site", list(batch.sites)),
                ("clinician", list(batch.clinicians))]
            for kind, rows in kinds:
                for where, entry in rows:
                    first = seen.setdefault((kind, entry.id), where)
                    if first != where:
                        problems.append(f"{where}: duplicate_id: {kind} {entry.id!r} is "
                                        f"already on {first}")
            known_sites = set(self.directory.all_sites) | {e.id for _, e in batch.sites}
            for where, c in batch.clinicians:
                if c.site not in known_sites:
                    problems.append(f"{where}: unknown_site: clinician {c.id!r} names site "
                                    f"{c.site!r}, which is neither in the directory nor in "
                                    "the file")
            if problems:
                problems.sort(key=_line_order)
                raise ImportRefused(problems)
            now = time.time()
            report = ImportReport(rows=batch.rows, dry_run=dry_run)
            regions = {e.id: e.name for _, e in batch.regions
                       if self.directory.regions.get(e.id) != e.name}
            report.regions = len(regions)
            sites: list[Site] = []
            for _, s in batch.sites:
                old_site = self.directory.all_sites.get(s.id)
                if old_site is not None and _site_fields(old_site) == s.model_dump():
                    report.unchanged += 1
                    continue
                sites.append(site_of(s, now))
                if old_site is None:
                    report.sites_created += 1
                else:
                    report.sites_updated += 1
            clinicians: list[Clinician] = []
            for _, c in batch.clinicians:
                old = self.directory.all_clinicians.get(c.id)
                if old is not None and _clinician_fields(old) == _clinician_fields(
                        clinician_of(c)):
                    report.unchanged += 1
                    continue
                clinicians.append(clinician_of(c, now))
                if old is None:
                    report.clinicians_created += 1
                else:
                    report.clinicians_updated += 1
            report.unchanged += len(batch.regions) - len(regions)
            if not dry_run and (sites or clinicians or regions):
                report.ended_sessions = await self._commit(
                    actor, "directory.import", sites=sites, clinicians=clinicians,
                    regions=regions, detail={
                        "regions": sorted(regions),
                        "sites_created": report.sites_created,
                        "sites_updated": report.sites_updated,
                        "clinicians_created": report.clinicians_created,
                        "clinicians_updated": report.clinicians_updated,
                        "ids": sorted({s.id for s in sites} | {c.id for c in clinicians})})
        report.seconds = time.monotonic() - started
        logger.info("directory import by %s%s: %s", actor, " (dry run)" if dry_run else "",
                    report.summary())
        return report

    # -- applying ----------------------------------------------------------------------------
    async def _commit(self, actor: str, action: str, *, sites: Iterable[Site] = (),
                      clinicians: Iterable[Clinician] = (),
                      regions: dict[str, str] | None = None,
                      detail: dict[str, Any]) -> int:
        """Store, then memory, then audit; then close the connections of those it affects.
        Returns how many connections were closed."""
        sites, clinicians = list(sites), list(clinicians)
        await self._store.save_directory(sites, clinicians, regions)
        before = {c.id: self.directory.all_clinicians.get(c.id) for c in clinicians}
        gone = self.directory.apply(sites, clinicians, regions)
        await self._audit.append_async(actor, action, None, detail)
        logger.info("directory: %s by %s (%d sites, %d clinicians)", action, actor, len(sites),
                    len(clinicians))
        if self._fleet is not None:
            await self._fleet.publish(DIRECTORY_CHANGED, {"sites": len(sites),
                                                          "clinicians": len(clinicians)})
        return await self._end_affected(gone, clinicians, before)

    async def _end_affected(self, gone: set[str], clinicians: list[Clinician],
                            before: dict[str, Clinician | None]) -> int:
        """Close this process's connections of clinicians who can no longer sign in, or whose
        grants narrowed."""
        changed = {c.id for c in clinicians if c.id not in gone and _narrowed(before[c.id], c)}
        if self._sessions is None:
            return 0
        closed = 0
        if gone:
            closed += await self._sessions.end_sessions(
                gone, INACTIVE, "Your account or your site was deactivated in the directory; "
                                "you have been signed out.")
        if changed:
            closed += await self._sessions.end_sessions(
                changed, CHANGED, "Your site, roles or specialties changed in the directory; "
                                  "sign in again.")
        return closed


def _narrowed(before: Clinician | None, after: Clinician) -> bool:
    """Whether a clinician's open connections now hold grants the directory no longer gives."""
    return before is not None and (before.site_id != after.site_id
                                   or not before.roles <= after.roles
                                   or not before.specialties <= after.specialties)


def _line_order(problem: str) -> tuple[int, str]:
    head = problem.split(":", 1)[0]
    number = head.removeprefix("line ")
    return (int(number), problem) if number.isdigit() else (0, problem)


def _require(allowed: bool, actor: Principal, what: str) -> None:
    if not allowed:
        raise Forbidden(f"{actor.id!r} ({', '.join(sorted(actor.roles)) or 'no role'}) may not "
                        f"{what}: that needs the role admin (or site_admin for the clinicians "
                        "of one's own site)")


def _slice(items: list[Any], page: int, per_page: int) -> list[Any]:
    start = (page - 1) * per_page
    return items[start:start + per_page]


def _page(items: list[dict[str, Any]], total: int, page: int, per_page: int,
          name: str) -> dict[str, Any]:
    return {name: items, "total": total, "page": page, "per_page": per_page,
            "pages": max(1, -(-total // per_page))}


class SearchQuery(BaseModel):
    """The query string of the list routes (``signaling.directory_api``)."""

    model_config = ConfigDict(extra="forbid")
    q: str = Field(default="", max_length=200)
    site: str | None = Field(default=None, max_length=64)
    role: Literal["referring", "specialist", "coordinator", "admin", "site_admin"] | None = None
    region: str | None = Field(default=None, max_length=16)
    active: bool | None = None
    page: int = Field(default=1, ge=1, le=100_000)
    per_page: int = Field(default=PER_PAGE, ge=1, le=MAX_PER_PAGE)


# -- the command line (telehealth directory import|export) --------------------------------------


def cli_import(directory: Directory, store: RecordStore, audit: AuditLog, path: Path, *,
               dry_run: bool, actor: str) -> int:
    """``telehealth directory import`` into ``store`` (not opened yet: opened and closed
    here): 0 when applied (or a clean dry run), 2 with every bad row on stderr when the file
    has any (then nothing changed)."""
    started = time.monotonic()
    batch = read_import_file(path)

    async def run() -> ImportReport:
        await store.open()
        try:
            return await DirectoryAdmin(directory, store, audit).import_batch(
                actor, batch, dry_run=dry_run)
        finally:
            await store.close()

    try:
        report = asyncio.run(run())
    except ImportRefused as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"telehealth: {len(exc.problems)} bad rows in {path}; nothing was imported",
              file=sys.stderr)
        return 2
    report.seconds = time.monotonic() - started  # reading and checking the file included
    print(("dry run, nothing changed: " if dry_run else "imported: ") + report.summary())
    return 0


def cli_import_remote(server: str, token: str, path: Path, *, dry_run: bool) -> int:
    """``telehealth directory import --server URL --token T``: the file sent as it is to a
    running server's ``POST /api/directory/import`` (which applies it live, as the token's
    admin); the same report and exit codes as a local import."""
    import aiohttp

    try:
        body = path.read_bytes()
    except OSError as exc:
        print(f"telehealth: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    content_type = "text/csv" if path.suffix.lower() == ".csv" else TOML_TYPE

    async def send() -> tuple[int, Any]:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                server.rstrip("/") + "/api/directory/import", data=body,
                params={"dry_run": "1" if dry_run else "0"},
                headers={"Authorization": f"Bearer {token}",
                         "Content-Type": f"{content_type}; charset=utf-8"}) as response:
            return response.status, await response.json()

    try:
        status, answer = asyncio.run(send())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        print(f"telehealth: {server}: {exc}", file=sys.stderr)
        return 2
    if status != 200:
        error = answer.get("error", {}) if isinstance(answer, dict) else {}
        for problem in error.get("problems", []):
            print(problem, file=sys.stderr)
        first = str(error.get("message", "")).splitlines()[:1]
        print(f"telehealth: {server} refused the import ({status} {error.get('code')}): "
              f"{''.join(first)}", file=sys.stderr)
        return 2
    report = ImportReport(**answer["import"])
    print(("dry run, nothing changed: " if dry_run else "imported: ") + report.summary())
    return 0


def cli_export(directory: Directory, out: Path | None) -> int:
    text = export_csv(directory)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        print(f"exported {len(directory.all_sites)} sites and {len(directory.all_clinicians)} "
              f"clinicians to {out}", file=sys.stderr)
    return 0
