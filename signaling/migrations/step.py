"""One numbered step of the records' schema, with its SQL for each backend."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """Step ``version`` brings the schema from ``version - 1`` to ``version``. The same step
    on both backends: where SQLite and PostgreSQL say it alike the two texts are equal; where
    their dialects differ (types, index methods) each says it its own way. A step's text is a
    list of statements separated by ``;`` and applied in one transaction with the row that
    records it in ``schema_migrations``: all of it or none."""

    version: int
    name: str
    sqlite: str
    postgresql: str
