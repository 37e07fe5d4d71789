"""The directory of sites (connection points) and clinicians.

It is read from a TOML file (``[[sites]]`` and ``[[clinicians]]`` tables) and mirrored into the
SQLite store so that records can refer to it; lookups are served from memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from config.settings import read_toml
from signaling.errors import DirectoryError
from signaling.models import Clinician, Role, Site, Tier

logger = logging.getLogger(__name__)

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _SiteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=_ID)
    name: str = Field(min_length=1, max_length=200)
    tier: Tier
    region: str = Field(min_length=1, max_length=16)


class _ClinicianEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=_ID)
    name: str = Field(min_length=1, max_length=200)
    site: str = Field(pattern=_ID)
    roles: list[Role] = Field(min_length=1)
    specialties: list[str] = Field(default_factory=list)


class _DirectoryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sites: list[_SiteEntry] = Field(default_factory=list)
    clinicians: list[_ClinicianEntry] = Field(default_factory=list)


class Directory:
    """Sites and clinicians by id."""

    def __init__(self, sites: Iterable[Site], clinicians: Iterable[Clinician]) -> None:
        self.sites: dict[str, Site] = {}
        self.clinicians: dict[str, Clinician] = {}
        for site in sites:
            if site.id in self.sites:
                raise DirectoryError(f"site id {site.id!r} appears twice")
            self.sites[site.id] = site
        for clinician in clinicians:
            if clinician.id in self.clinicians:
                raise DirectoryError(f"clinician id {clinician.id!r} appears twice")
            if clinician.site_id not in self.sites:
                raise DirectoryError(
                    f"clinician {clinician.id!r} names site {clinician.site_id!r}, "
                    "which is not in the directory"
                )
            self.clinicians[clinician.id] = clinician
        self._specialties = frozenset(s for c in self.clinicians.values() for s in c.specialties)

    def site(self, site_id: str) -> Site | None:
        return self.sites.get(site_id)

    def clinician(self, clinician_id: str) -> Clinician | None:
        return self.clinicians.get(clinician_id)

    def specialties(self) -> frozenset[str]:
        """Every specialty some clinician of the directory offers."""
        return self._specialties

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "directory") -> Directory:
        try:
            parsed = _DirectoryFile.model_validate(data)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                key = ".".join(str(p) for p in error["loc"])
                problems.append(f"{key} = {error.get('input')!r}: {error['msg']}")
            raise DirectoryError(f"{source} is invalid:\n  " + "\n  ".join(problems)) from None
        sites = [Site(s.id, s.name, s.tier, s.region) for s in parsed.sites]
        clinicians = [
            Clinician(c.id, c.name, c.site, frozenset(c.roles), frozenset(c.specialties))
            for c in parsed.clinicians
        ]
        return cls(sites, clinicians)

    @classmethod
    def load(cls, path: Path) -> Directory:
        data = read_toml(path, "directory file", DirectoryError)
        directory = cls.from_mapping(data, source=str(path))
        logger.info(
            "directory %s: %d sites, %d clinicians",
            path, len(directory.sites), len(directory.clinicians),
        )
        return directory
