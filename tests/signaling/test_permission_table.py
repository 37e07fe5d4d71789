"""Who may do what, as one table: role (and central or district site) x relation to the
consultation or request x action -> allowed. Pure: the rules of ``signaling.permissions``, no
server."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest

from signaling import permissions
from signaling.live import Participant
from signaling.models import Clinician, Consultation, ConsultRequest, Site
from signaling.tokens import Principal

CENTRAL = Site("c1", "Central One", "central", "01")
DISTRICT = Site("d1", "District One", "district", "11")
INVITED = Site("d3", "District Three", "district", "22")
ELSEWHERE = Site("d2", "District Two", "district", "79")

ROLES = ("referring", "specialist", "coordinator", "admin")
RELATIONS = ("host", "named", "attended", "invited site", "stranger")


def principal(role: str, site: Site, clinician_id: str) -> Principal:
    clinician = Clinician(clinician_id, clinician_id, site.id, frozenset({role}),
                          frozenset({"cardiology"}))
    return Principal(clinician, site, clinician.roles, clinician.specialties, 2e9)


def case(role: str, tier: str, relation: str) -> tuple[Principal, Consultation, ConsultRequest,
                                                       frozenset[str], Participant | None]:
    """The principal and what it is related to: a live consultation (host ``host``, requester
    ``requester``, site d3 invited) and the cardiology request it came from. ``host`` and
    ``named`` are named on both; ``attended`` joined without being named; ``invited site`` is
    a clinician of the invited site who has not joined; the stranger is none of these. Host,
    named and attended are in the consultation now."""
    home = CENTRAL if tier == "central" else DISTRICT
    site = {"invited site": INVITED, "stranger": ELSEWHERE if tier == "district" else home}.get(
        relation, home)
    me = {"host": "host", "named": "requester"}.get(relation, "me")
    who = principal(role, site, me)
    consultation = Consultation(
        id="con_1", request_id="req_1", host_id="host", relay_id="embedded", state="live",
        created_at=1.0, site_ids=["d1", "c1", "d3"], clinician_ids=["requester", "host"],
        invited_site_ids=["d3"])
    request = ConsultRequest(
        id="req_1", site_id="d1", requester_id="requester", specialty="cardiology",
        priority="urgent", reason="x", patient_pseudonym=None, status="waiting",
        created_at=1.0)
    attendees = frozenset({"requester", "host"} | ({"me"} if relation == "attended" else set()))
    present = relation in ("host", "named", "attended")
    participant = Participant("con_1", me, site.id, 1.0) if present else None
    return who, consultation, request, attendees, participant


Check = Callable[[Principal, Consultation, ConsultRequest, frozenset[str], Participant | None],
                 bool]

ACTIONS: dict[str, Check] = {
    "request": lambda p, c, r, a, m: permissions.may_request(p),
    "cancel": lambda p, c, r, a, m: permissions.may_cancel(p, r),
    "accept": lambda p, c, r, a, m: permissions.may_accept(p, r),
    "see queue": lambda p, c, r, a, m: permissions.may_see_queue(p),
    "see whole queue": lambda p, c, r, a, m: permissions.sees_every_request(p),
    "join": lambda p, c, r, a, m: permissions.may_join(p, c),
    "chat": lambda p, c, r, a, m: permissions.may_chat(p, c),
    "invite": lambda p, c, r, a, m: permissions.may_invite(p, c),
    "end": lambda p, c, r, a, m: permissions.may_end(p, c),
    "media": lambda p, c, r, a, m: permissions.is_in(p, m),
    "consent": lambda p, c, r, a, m: permissions.is_in(p, m),
    "start recording": lambda p, c, r, a, m: (permissions.is_in(p, m)
                                              and permissions.may_control_recording(p, c)),
    "read record": lambda p, c, r, a, m: permissions.may_read(p, c, a),
    "read recordings": lambda p, c, r, a, m: permissions.may_read(p, c, a),
    "list all": lambda p, c, r, a, m: permissions.lists_every_consultation(p),
    "metrics": lambda p, c, r, a, m: permissions.may_read_metrics(p),
}

# Rows: (role, tier of the clinician's own site, relation). Columns: ACTIONS in order: request,
# cancel, accept, see queue, see whole queue, join, chat (talk), invite, end, media, consent,
# start recording, read record (dossier), read recordings (listing), list all, metrics.
# Y allowed, . refused. "named" is the requester (named on request and consultation).
COLUMNS = tuple(ACTIONS)
TABLE: dict[tuple[str, str, str], str] = {
    # columns:                                  r c a q w j t i e m o s d l L M
    ("referring", "district", "host"):          "Y . . . . Y Y Y Y Y Y Y Y Y . .",
    ("referring", "district", "named"):         "Y Y . . . Y Y . . Y Y . Y Y . .",
    ("referring", "district", "attended"):      "Y . . . . . . . . Y Y . Y Y . .",
    ("referring", "district", "invited site"):  "Y . . . . Y Y . . . . . . . . .",
    ("referring", "district", "stranger"):      "Y . . . . . . . . . . . . . . .",
    ("specialist", "central", "host"):          ". . Y Y . Y Y Y Y Y Y Y Y Y . .",
    ("specialist", "central", "named"):         ". Y Y Y . Y Y . . Y Y . Y Y . .",
    ("specialist", "central", "attended"):      ". . Y Y . . . . . Y Y . Y Y . .",
    ("specialist", "central", "invited site"):  ". . . . . Y Y . . . . . . . . .",
    ("specialist", "central", "stranger"):      ". . Y Y . . . . . . . . . . . .",
    ("specialist", "district", "host"):         ". . . . . Y Y Y Y Y Y Y Y Y . .",
    ("specialist", "district", "stranger"):     ". . . . . . . . . . . . . . . .",
    ("coordinator", "central", "host"):         ". Y Y Y Y Y Y Y Y Y Y Y Y Y Y Y",
    ("coordinator", "central", "attended"):     ". Y Y Y Y Y Y Y Y Y Y Y Y Y Y Y",
    ("coordinator", "central", "invited site"): ". Y Y Y Y Y Y Y Y . . . . . Y Y",
    ("coordinator", "central", "stranger"):     ". Y Y Y Y Y Y Y Y . . . . . Y Y",
    ("admin", "central", "host"):               ". . . . . Y Y Y Y Y Y Y Y Y Y Y",
    ("admin", "central", "named"):              ". Y . . . Y Y . . Y Y . Y Y Y Y",
    ("admin", "central", "invited site"):       ". . . . . Y Y . . . . . Y Y Y Y",
    ("admin", "central", "stranger"):           ". . . . . . . . . . . . Y Y Y Y",
    ("admin", "district", "stranger"):          ". . . . . . . . . . . . Y Y Y Y",
}

ROWS = [(role, tier, relation, column, cells.split()[i] == "Y")
        for (role, tier, relation), cells in TABLE.items()
        for i, column in enumerate(COLUMNS)]


def test_the_table_is_well_formed() -> None:
    for key, cells in TABLE.items():
        assert len(cells.split()) == len(COLUMNS), key
        assert set(cells.split()) <= {"Y", "."}, key
        assert key[0] in ROLES and key[2] in RELATIONS, key


@pytest.mark.parametrize(("role", "tier", "relation", "action", "allowed"), ROWS,
                         ids=[f"{r}-{t}-{rel}-{a}" for r, t, rel, a, _ in ROWS])
def test_who_may_do_what(role: str, tier: str, relation: str, action: str,
                         allowed: bool) -> None:
    who, consultation, request, attendees, participant = case(role, tier, relation)
    assert ACTIONS[action](who, consultation, request, attendees, participant) is allowed


def test_an_escalated_request_is_open_to_every_central_specialist() -> None:
    who, _, request, _, _ = case("specialist", "central", "stranger")
    neurologist = Principal(who.clinician, who.site, who.roles, frozenset({"neurology"}), 2e9)
    assert not permissions.may_accept(neurologist, request)
    request.escalated_at = 2.0
    assert permissions.may_accept(neurologist, request)
    assert permissions.sees_escalated_requests(neurologist)
    district, _, _, _, _ = case("specialist", "district", "stranger")
    assert not permissions.may_accept(district, request)


def test_a_clinician_who_left_is_not_in_the_consultation_but_still_reads_it() -> None:
    who, consultation, _, attendees, _ = case("referring", "district", "attended")
    assert not permissions.is_in(who, None)
    assert permissions.may_read(who, consultation, attendees)


# -- the directory (signaling.directory_admin) ---------------------------------------------------
# Rows: (role of the actor, where the target is: the actor's own site or another). Columns:
# v view the directory, E see every clinician (else only one's own site's), S manage sites
# (and regions, imports, exports), a add a clinician to the target site (or move one there),
# then the roles the actor may grant: r referring, s specialist, c coordinator, A admin,
# X site_admin; then edit/deactivate/reactivate a clinician of the target site who is
# m referring, M a coordinator, N a site admin.

DIRECTORY_ROLES = ("admin", "site_admin", "coordinator", "specialist", "referring")
TARGET = {"own site": DISTRICT, "other site": ELSEWHERE}


def _target(role: str, site: Site) -> Clinician:
    return Clinician(f"x-{role}", "X", site.id, frozenset({role}), frozenset())


def _grants(role: str, p: Principal, s: Site) -> bool:
    return role in permissions.grantable_roles(p)


def _manages(role: str, p: Principal, s: Site) -> bool:
    return permissions.may_manage_clinician(p, _target(role, s))


DIRECTORY_ACTIONS: dict[str, Callable[[Principal, Site], bool]] = {
    "view": lambda p, s: permissions.may_view_directory(p),
    "every clinician": lambda p, s: permissions.sees_every_clinician(p),
    "manage sites": lambda p, s: permissions.may_manage_sites(p),
    "add clinician": lambda p, s: permissions.may_manage_clinicians_of(p, s.id),
    **{f"grant {role}": partial(_grants, role)
       for role in ("referring", "specialist", "coordinator", "admin", "site_admin")},
    **{f"manage a {role}": partial(_manages, role)
       for role in ("referring", "coordinator", "site_admin")},
}
DIRECTORY_TABLE: dict[tuple[str, str], str] = {
    # columns:                       v E S a r s c A X m M N
    ("admin", "own site"):          "Y Y Y Y Y Y Y Y Y Y Y Y",
    ("admin", "other site"):        "Y Y Y Y Y Y Y Y Y Y Y Y",
    ("site_admin", "own site"):     "Y . . Y Y Y . . . Y . .",
    ("site_admin", "other site"):   "Y . . . Y Y . . . . . .",
    ("coordinator", "own site"):    ". . . . . . . . . . . .",
    ("coordinator", "other site"):  ". . . . . . . . . . . .",
    ("specialist", "own site"):     ". . . . . . . . . . . .",
    ("specialist", "other site"):   ". . . . . . . . . . . .",
    ("referring", "own site"):      ". . . . . . . . . . . .",
    ("referring", "other site"):    ". . . . . . . . . . . .",
}
DIRECTORY_ROWS = [(role, where, column, cells.split()[i] == "Y")
                  for (role, where), cells in DIRECTORY_TABLE.items()
                  for i, column in enumerate(DIRECTORY_ACTIONS)]


def test_the_directory_table_is_well_formed() -> None:
    assert {r for r, _ in DIRECTORY_TABLE} == set(DIRECTORY_ROLES)
    for key, cells in DIRECTORY_TABLE.items():
        assert len(cells.split()) == len(DIRECTORY_ACTIONS), key
        assert set(cells.split()) <= {"Y", "."}, key


@pytest.mark.parametrize(("role", "where", "action", "allowed"), DIRECTORY_ROWS,
                         ids=[f"{r}-{w}-{a}" for r, w, a, _ in DIRECTORY_ROWS])
def test_who_may_change_the_directory(role: str, where: str, action: str,
                                      allowed: bool) -> None:
    actor = principal(role, DISTRICT, "actor")
    assert DIRECTORY_ACTIONS[action](actor, TARGET[where]) is allowed
