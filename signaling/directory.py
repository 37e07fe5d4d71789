"""The directory of sites (connection points), clinicians and regions (province code -> name).

The SQLite store is its source of truth (``signaling.store``: tables ``sites``, ``clinicians``,
``regions``); a TOML file (``[[sites]]``, ``[[clinicians]]``, ``[[regions]]`` tables) or a CSV
file is only an import source: it seeds an empty store at start-up, and ``telehealth directory
import`` reads it. Lookups are served from memory, and ``Directory.apply`` changes them in place,
so a change made through ``signaling.directory_admin`` takes effect at once, without a restart.

Deactivated sites and clinicians stay in ``all_sites`` and ``all_clinicians`` (the records name
them) but are out of the lookups every other module uses (``site``, ``clinician``, ``sites``,
``clinicians``): a deactivated clinician, or any clinician of a deactivated site, cannot sign in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from config.settings import read_toml
from signaling.errors import DirectoryError
from signaling.models import Clinician, Role, Site, Tier

logger = logging.getLogger(__name__)

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_REGION = r"^[A-Za-z0-9_.-]{1,16}$"


class _SiteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=_ID)
    name: str = Field(min_length=1, max_length=200)
    tier: Tier
    region: str = Field(min_length=1, max_length=16)
    active: bool = True


class _ClinicianEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=_ID)
    name: str = Field(min_length=1, max_length=200)
    site: str = Field(pattern=_ID)
    roles: list[Role] = Field(min_length=1)
    specialties: list[str] = Field(default_factory=list)
    active: bool = True


class _RegionEntry(BaseModel):
    """A province: its code (the one sites carry in ``region``) and its Vietnamese name."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=_REGION)
    name: str = Field(min_length=1, max_length=200)


class _DirectoryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sites: list[_SiteEntry] = Field(default_factory=list)
    clinicians: list[_ClinicianEntry] = Field(default_factory=list)
    regions: list[_RegionEntry] = Field(default_factory=list)


def site_of(entry: _SiteEntry, updated_at: float = 0.0) -> Site:
    return Site(entry.id, entry.name, entry.tier, entry.region, entry.active, updated_at)


def clinician_of(entry: _ClinicianEntry, updated_at: float = 0.0) -> Clinician:
    return Clinician(entry.id, entry.name, entry.site, frozenset(entry.roles),
                     frozenset(entry.specialties), entry.active, updated_at)


def describe(exc: ValidationError) -> list[str]:
    """One line per problem of a pydantic error: the field, the value, what is wrong."""
    problems = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "entry"
        problems.append(f"{key} = {error.get('input')!r}: {error['msg']}")
    return problems


class Directory:
    """Sites, clinicians and region names by id; ``sites`` and ``clinicians`` hold only what
    is active (a clinician counts only while their site is active too), and the sites there
    carry their province's name (``Site.region_name``)."""

    def __init__(self, sites: Iterable[Site], clinicians: Iterable[Clinician],
                 regions: Mapping[str, str] | None = None) -> None:
        self.sites: dict[str, Site] = {}
        self.clinicians: dict[str, Clinician] = {}
        self.all_sites: dict[str, Site] = {}
        self.all_clinicians: dict[str, Clinician] = {}
        self.regions: dict[str, str] = dict(regions or {})
        for site in sites:
            if site.id in self.all_sites:
                raise DirectoryError(f"site id {site.id!r} appears twice")
            self.all_sites[site.id] = site
        for clinician in clinicians:
            if clinician.id in self.all_clinicians:
                raise DirectoryError(f"clinician id {clinician.id!r} appears twice")
            if clinician.site_id not in self.all_sites:
                raise DirectoryError(
                    f"clinician {clinician.id!r} names site {clinician.site_id!r}, "
                    "which is not in the directory"
                )
            self.all_clinicians[clinician.id] = clinician
        self._specialties: frozenset[str] = frozenset()
        self._refresh()

    def site(self, site_id: str) -> Site | None:
        return self.sites.get(site_id)

    def clinician(self, clinician_id: str) -> Clinician | None:
        return self.clinicians.get(clinician_id)

    def specialties(self) -> frozenset[str]:
        """Every specialty some active clinician of the directory offers."""
        return self._specialties

    def region_name(self, code: str) -> str:
        """The province's Vietnamese name, or the code itself when the directory has none."""
        return self.regions.get(code, code)

    def apply(self, sites: Iterable[Site] = (), clinicians: Iterable[Clinician] = (),
              regions: Mapping[str, str] | None = None) -> set[str]:
        """Put new or changed records in place (the caller validated them and stored them
        first); return the ids of the clinicians who could sign in before and no longer can."""
        before = set(self.clinicians)
        for site in sites:
            self.all_sites[site.id] = site
        for clinician in clinicians:
            self.all_clinicians[clinician.id] = clinician
        self.regions.update(regions or {})
        self._refresh()
        return before - set(self.clinicians)

    def _refresh(self) -> None:
        """Rebuild the lookups in place: other modules hold references to these dicts."""
        active_sites = {i: replace(s, region_name=self.regions.get(s.region, ""))
                        for i, s in self.all_sites.items() if s.active}
        self.sites.clear()
        self.sites.update(active_sites)
        self.clinicians.clear()
        self.clinicians.update(
            (i, c) for i, c in self.all_clinicians.items() if c.active and c.site_id in self.sites
        )
        self._specialties = frozenset(s for c in self.clinicians.values() for s in c.specialties)

    @classmethod
    def parse(cls, data: dict[str, Any], source: str = "directory") -> _DirectoryFile:
        """The entries of a directory mapping (a TOML file's tables), or DirectoryError naming
        every bad one."""
        try:
            return _DirectoryFile.model_validate(data)
        except ValidationError as exc:
            raise DirectoryError(f"{source} is invalid:\n  " + "\n  ".join(describe(exc))
                                 ) from None

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "directory") -> Directory:
        parsed = cls.parse(data, source)
        return cls([site_of(s) for s in parsed.sites],
                   [clinician_of(c) for c in parsed.clinicians],
                   {r.id: r.name for r in parsed.regions})

    @classmethod
    def load(cls, path: Path) -> Directory:
        data = read_toml(path, "directory file", DirectoryError)
        directory = cls.from_mapping(data, source=str(path))
        logger.info(
            "directory %s: %d sites, %d clinicians",
            path, len(directory.sites), len(directory.clinicians),
        )
        return directory
