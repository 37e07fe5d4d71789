"""Step 2: indexes for the lookups that scanned whole tables: a requester's own requests
(``requests_of``, newest first), the consultations still open (``active_consultations``, at
every start and, in a fleet, on every node), and on PostgreSQL the consultations naming a
clinician or inviting a site (``consultations_for``: GIN on the JSONB id lists; SQLite has no
index for what ``json_each`` finds)."""

from __future__ import annotations

from signaling.migrations.step import Step

COMMON = """
CREATE INDEX requests_requester ON requests (requester_id, created_at);
CREATE INDEX consultations_state ON consultations (state);
"""

STEP = Step(
    2, "lookup indexes", sqlite=COMMON,
    postgresql=COMMON + """
CREATE INDEX consultations_clinicians ON consultations USING GIN (clinician_ids);
CREATE INDEX consultations_invited ON consultations USING GIN (invited_site_ids);
""")
