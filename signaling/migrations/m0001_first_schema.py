"""Step 1: the records' schema as it was when migrations began (the directory, requests,
consultations with their minutes, chat and attendance).

SQLite keeps ``CREATE ... IF NOT EXISTS``: a records file written before migrations existed has
these tables already, and this step recognises it (``signaling.migrations.migrate_sqlite``
adds the two directory columns that older files lack first). PostgreSQL says the same with
its own types: DOUBLE PRECISION for the float timestamps (PostgreSQL's REAL is 4 bytes and
would round them), BOOLEAN for ``active``, JSONB for the id lists."""

from __future__ import annotations

from signaling.migrations.step import Step

SQLITE = """
CREATE TABLE IF NOT EXISTS sites (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, tier TEXT NOT NULL, region TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1, updated_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS clinicians (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, site_id TEXT NOT NULL,
    roles TEXT NOT NULL, specialties TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1, updated_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS regions (id TEXT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, site_id TEXT NOT NULL, requester_id TEXT NOT NULL,
    specialty TEXT NOT NULL, priority TEXT NOT NULL, reason TEXT NOT NULL,
    patient_pseudonym TEXT, status TEXT NOT NULL, created_at REAL NOT NULL,
    escalated_at REAL, accepted_by TEXT, accepted_at REAL, consultation_id TEXT, closed_at REAL
);
CREATE INDEX IF NOT EXISTS requests_status ON requests (status);
CREATE TABLE IF NOT EXISTS consultations (
    id TEXT PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, host_id TEXT NOT NULL,
    relay_id TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
    started_at REAL, ended_at REAL, site_ids TEXT NOT NULL, clinician_ids TEXT NOT NULL,
    invited_site_ids TEXT NOT NULL, conclusion TEXT, signed_by TEXT, signed_at REAL
);
CREATE TABLE IF NOT EXISTS chat (
    id TEXT PRIMARY KEY, consultation_id TEXT NOT NULL, sender_id TEXT NOT NULL,
    site_id TEXT NOT NULL, text TEXT NOT NULL, sent_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS chat_consultation ON chat (consultation_id, sent_at);
CREATE TABLE IF NOT EXISTS attendance (
    consultation_id TEXT NOT NULL, clinician_id TEXT NOT NULL, site_id TEXT NOT NULL,
    joined_at REAL NOT NULL, left_at REAL
);
CREATE INDEX IF NOT EXISTS attendance_consultation ON attendance (consultation_id);
"""

POSTGRESQL = """
CREATE TABLE sites (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, tier TEXT NOT NULL, region TEXT NOT NULL,
    active BOOLEAN NOT NULL DEFAULT TRUE, updated_at DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE TABLE clinicians (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, site_id TEXT NOT NULL,
    roles JSONB NOT NULL, specialties JSONB NOT NULL,
    active BOOLEAN NOT NULL DEFAULT TRUE, updated_at DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE TABLE regions (id TEXT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE requests (
    id TEXT PRIMARY KEY, site_id TEXT NOT NULL, requester_id TEXT NOT NULL,
    specialty TEXT NOT NULL, priority TEXT NOT NULL, reason TEXT NOT NULL,
    patient_pseudonym TEXT, status TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    escalated_at DOUBLE PRECISION, accepted_by TEXT, accepted_at DOUBLE PRECISION,
    consultation_id TEXT, closed_at DOUBLE PRECISION
);
CREATE INDEX requests_status ON requests (status);
CREATE TABLE consultations (
    id TEXT PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, host_id TEXT NOT NULL,
    relay_id TEXT NOT NULL, state TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION, ended_at DOUBLE PRECISION, site_ids JSONB NOT NULL,
    clinician_ids JSONB NOT NULL, invited_site_ids JSONB NOT NULL, conclusion TEXT,
    signed_by TEXT, signed_at DOUBLE PRECISION
);
CREATE TABLE chat (
    id TEXT PRIMARY KEY, consultation_id TEXT NOT NULL, sender_id TEXT NOT NULL,
    site_id TEXT NOT NULL, text TEXT NOT NULL, sent_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX chat_consultation ON chat (consultation_id, sent_at);
CREATE TABLE attendance (
    consultation_id TEXT NOT NULL, clinician_id TEXT NOT NULL, site_id TEXT NOT NULL,
    joined_at DOUBLE PRECISION NOT NULL, left_at DOUBLE PRECISION
);
CREATE INDEX attendance_consultation ON attendance (consultation_id);
"""

STEP = Step(1, "first schema", sqlite=SQLITE, postgresql=POSTGRESQL)
