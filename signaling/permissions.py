"""Who may do what in signaling: every permission rule as a pure function of the caller (a
``Principal``) and the record concerned. The socket.io handlers and the HTTP routes call the
services, and the services ask these functions; no rule is written anywhere else.

The rules:

- **request** a consultation: referring doctors.
- **cancel** a waiting request: its requester, or a coordinator.
- **accept** a request: a coordinator, or a specialist of a central site whose specialties
  include the request's (any specialty once the request has escalated).
- **queue visibility**: coordinators see every waiting request; central specialists see the
  lanes of their specialties plus escalated requests; nobody else sees the queue. Referring
  doctors see their own requests.
- **join** a consultation (and **chat** in it): the clinicians named on it (requester and
  host), the clinicians of a site invited into it, and coordinators.
- **invite** a site, **end** the consultation, **start/stop recording**: its host, or a
  coordinator (recording control also needs them to be in the consultation).
- **consent** to recording and **media** steps: a clinician who is in the consultation (joined,
  present or reconnecting: ``is_in``). The pre-call check's ``media:ice_servers`` and
  ``media:probe`` come before joining, so they follow **join** (``may_join``).
- **read** a consultation, one rule for its record (minutes, chat, attendance) and for its
  recordings (list and download): *a user reaches only the consultations they belong to*:
  the clinicians named on it, the clinicians who attended it (joined it at least once), and
  admins, who keep the archive. Being allowed to join (a clinician of an invited site, a
  coordinator) is not belonging: they belong once they have joined. (Before, the record was
  also open to every coordinator and every clinician of an invited site, while recordings
  were not; the stricter rule, the one the design asks of the archive, now holds for both.)
- **list** consultations: coordinators and admins list every consultation; others list those
  they are named on or whose sites were invited.
- **metrics**: admins and coordinators (or the configured metrics token).
- **the directory** (``signaling.directory_admin``): admins manage everything (sites, regions,
  every clinician, every role). A *site admin* (role ``site_admin``) sees the sites and manages
  the clinicians of their own site only: adds, edits, deactivates and reactivates them, never
  moves one to or from another site, and grants only ``referring`` and ``specialist``; a
  clinician holding a role they may not grant (an admin, a coordinator, another site admin) is
  out of their reach too, since editing or deactivating them would take that role away.
  Everyone else: nothing.
"""

from __future__ import annotations

from collections.abc import Collection

from signaling.live import Participant
from signaling.models import Clinician, Consultation, ConsultRequest
from signaling.tokens import Principal

# -- consult requests and the queue -------------------------------------------------------------


def is_central_specialist(principal: Principal) -> bool:
    return principal.has("specialist") and principal.site.tier == "central"


def may_request(principal: Principal) -> bool:
    return principal.has("referring")


def may_cancel(principal: Principal, request: ConsultRequest) -> bool:
    return request.requester_id == principal.id or principal.has("coordinator")


def may_accept(principal: Principal, request: ConsultRequest) -> bool:
    if principal.has("coordinator"):
        return True
    if not is_central_specialist(principal):
        return False
    return request.specialty in principal.specialties or request.escalated_at is not None


def may_see_queue(principal: Principal) -> bool:
    """Whether the clinician sees (part of) the queue of waiting requests."""
    return sees_every_request(principal) or is_central_specialist(principal)


def sees_every_request(principal: Principal) -> bool:
    return principal.has("coordinator")


def sees_escalated_requests(principal: Principal) -> bool:
    """Escalated requests of any specialty reach every central specialist."""
    return is_central_specialist(principal)


def has_own_requests(principal: Principal) -> bool:
    return principal.has("referring")


# -- a consultation -----------------------------------------------------------------------------


def may_join(principal: Principal, consultation: Consultation) -> bool:
    return (
        principal.id in consultation.clinician_ids
        or principal.site.id in consultation.invited_site_ids
        or principal.has("coordinator")
    )


def may_chat(principal: Principal, consultation: Consultation) -> bool:
    return may_join(principal, consultation)


def _hosts_or_coordinates(principal: Principal, consultation: Consultation) -> bool:
    return principal.id == consultation.host_id or principal.has("coordinator")


def may_invite(principal: Principal, consultation: Consultation) -> bool:
    return _hosts_or_coordinates(principal, consultation)


def may_end(principal: Principal, consultation: Consultation) -> bool:
    return _hosts_or_coordinates(principal, consultation)


def is_in(principal: Principal, participant: Participant | None) -> bool:
    """Media steps, consent to recording, and recording control need the clinician in the
    consultation: ``participant`` is the live membership found for them (joined, present or
    reconnecting), or None."""
    return participant is not None and participant.clinician_id == principal.id


def may_control_recording(principal: Principal, consultation: Consultation) -> bool:
    """Start or stop the recording (of a consultation the principal ``is_in``)."""
    return _hosts_or_coordinates(principal, consultation)


def may_read(principal: Principal, consultation: Consultation,
             attendees: Collection[str]) -> bool:
    """The record and the recordings of a consultation; ``attendees`` are the clinicians who
    joined it at least once (its attendance)."""
    return (
        principal.has("admin")
        or principal.id in consultation.clinician_ids
        or principal.id in attendees
    )


def lists_every_consultation(principal: Principal) -> bool:
    return principal.has("coordinator") or principal.has("admin")


# -- operations ---------------------------------------------------------------------------------


def may_read_metrics(principal: Principal) -> bool:
    return principal.has("admin") or principal.has("coordinator")


# -- the directory ------------------------------------------------------------------------------

ALL_ROLES = frozenset({"referring", "specialist", "coordinator", "admin", "site_admin"})
SITE_ADMIN_GRANTS = frozenset({"referring", "specialist"})


def may_view_directory(principal: Principal) -> bool:
    """List and search sites and clinicians (a site admin's clinician list is their site's)."""
    return principal.has("admin") or principal.has("site_admin")


def sees_every_clinician(principal: Principal) -> bool:
    return principal.has("admin")


def may_manage_sites(principal: Principal) -> bool:
    """Add, edit, deactivate and reactivate sites; name regions; import a directory file."""
    return principal.has("admin")


def grantable_roles(principal: Principal) -> frozenset[str]:
    if principal.has("admin"):
        return ALL_ROLES
    if principal.has("site_admin"):
        return SITE_ADMIN_GRANTS
    return frozenset()


def may_manage_clinicians_of(principal: Principal, site_id: str) -> bool:
    """Add a clinician to the site ``site_id`` (or move one there)."""
    return principal.has("admin") or (
        principal.has("site_admin") and principal.site.id == site_id)


def may_manage_clinician(principal: Principal, clinician: Clinician) -> bool:
    """Edit, deactivate or reactivate ``clinician`` (as they are now)."""
    return (may_manage_clinicians_of(principal, clinician.site_id)
            and clinician.roles <= grantable_roles(principal))


def may_issue_activation(principal: Principal, clinician: Clinician) -> bool:
    """An activation or password-reset code for ``clinician`` (signaling/accounts.py): who may
    manage the clinician. A site admin may not reset an admin's password on their site: that
    would hand them the admin's account."""
    return may_manage_clinician(principal, clinician)
