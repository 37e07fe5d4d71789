"""The consent and recording state machine of one consultation, without I/O.

Events (``join``, ``leave``, ``answer``, ``host_start``, ``host_stop``, ``failure``,
``ended``) change the state and return a :class:`Decision`: open a recording session, record
exactly these participants, or close the session. The recorder (``recorder.service``) carries
the decision out on the disk and the relay and reports the outcome back (``session_started``,
``start_failed``, ``session_stopped``); ``status`` and ``view`` are what clients are shown.

Policies: ``always`` records from the start; ``with_consent`` asks every participant and
starts only when all present agree, asks later joiners too (their media is written once they
agree), and stops if anyone present declines; ``never`` records nothing. The host may stop and
start again (a new request: those who declined are asked again). A failure (a disk error, no
relay) stops recording until the host starts it again.

A recording whose media went away while it was on (the consultation moved to another relay, the
server stopped or died) is ``suspended``: it is still on for everyone (the state shown says so)
and the recorder opens a new session as soon as the media is back; the rules above still hold
meanwhile (a host's stop or a decline ends the suspension; nothing resumes by itself then).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Answer = Literal["agreed", "declined", "pending"]
Status = Literal["off", "pending", "on", "declined", "stopped", "failed", "disabled"]
STRICTNESS: dict[str, int] = {"always": 0, "with_consent": 1, "never": 2}


def strictest(policies: list[str]) -> str:
    """The consultation follows the strictest policy among its sites."""
    return max(policies, key=lambda p: STRICTNESS[p]) if policies else "with_consent"


@dataclass(frozen=True)
class Decision:
    """What the recorder does after an event."""

    start: bool = False
    """Open a recording session, then report ``session_started`` or ``start_failed``."""
    stop: bool = False
    """Close the recording session, then report ``session_stopped``."""
    allow: frozenset[str] | None = None
    """Record exactly these participants (on the session that runs, or the one opened)."""


NOTHING = Decision()


@dataclass
class ConsentMachine:
    policy: str = "with_consent"
    present: dict[str, str] = field(default_factory=dict)
    """Clinician -> site of the participants in the consultation now."""
    answers: dict[str, tuple[Answer, float | None]] = field(default_factory=dict)
    """Clinician -> (``agreed`` | ``declined`` | ``pending``, when answered)."""
    wanted: bool = True
    """Recording is asked for (the default; the host may stop it)."""
    started: bool = False
    """The current request has begun recording (consent was complete)."""
    recording: bool = False
    """A recording session is open."""
    error: str | None = None
    since: float | None = None
    """When the open session started."""
    suspended: bool = False
    """Recording was on when its media went away (a relay move, a server restart): it resumes
    in a new session once the media is back, unless the rules say otherwise meanwhile."""

    # -- events ------------------------------------------------------------------------------
    def join(self, clinician_id: str, site_id: str) -> Decision:
        self.present[clinician_id] = site_id
        if self.policy == "with_consent" and clinician_id not in self.answers:
            self.answers[clinician_id] = ("pending", None)
        return self.decide()

    def present_again(self, present: dict[str, str]) -> Decision:
        """Another signaling process takes the recording over (a fleet: the media moved to a
        relay connected there) and tells who is in the consultation: as if each had joined,
        in one decision."""
        for clinician_id, site_id in present.items():
            self.present[clinician_id] = site_id
            if self.policy == "with_consent" and clinician_id not in self.answers:
                self.answers[clinician_id] = ("pending", None)
        return self.decide()

    def leave(self, clinician_id: str) -> Decision:
        self.present.pop(clinician_id, None)
        if self._answer(clinician_id) == "pending":
            del self.answers[clinician_id]
        return self.decide()

    def answer(self, clinician_id: str, agree: bool, at: float) -> Decision:
        self.answers[clinician_id] = ("agreed" if agree else "declined", at)
        return self.decide()

    def host_start(self) -> Decision:
        """The host asks for recording (again): everyone present who has not agreed is
        asked."""
        self.wanted = True
        self.error = None
        if self.policy == "with_consent":
            for clinician_id in self.present:
                if self._answer(clinician_id) != "agreed":
                    self.answers[clinician_id] = ("pending", None)
        return self.decide()

    def host_stop(self) -> Decision:
        self.wanted = False
        return self.decide()

    def failure(self, message: str) -> Decision:
        """The session failed (a disk error): it stops, and recording stays off until the host
        starts it again."""
        self.error = message
        self.suspended = False
        return Decision(stop=True) if self.recording else NOTHING

    def ended(self) -> Decision:
        """The consultation ended: the session closes."""
        self.suspended = False
        return Decision(stop=True) if self.recording else NOTHING

    def suspend(self) -> None:
        """The open session's media went away (its relay is gone, the server stops): recording
        stays on and resumes in a new session (``decide`` asks for it)."""
        if self.recording:
            self.recording = False
            self.since = None
            self.suspended = True

    def resume_after_restart(self, *, host_stopped: bool, error: str | None) -> None:
        """A restarted server found this recording on when the last one stopped (its manifest
        says so): it resumes as it was, with the consents already given (the answers are loaded
        separately). A recording the host had stopped, or that had failed, stays off."""
        self.wanted = not host_stopped
        self.error = error
        if self.wanted and error is None:
            self.started = True
            self.suspended = True

    # -- outcomes the recorder reports -------------------------------------------------------
    def session_started(self, at: float) -> None:
        self.recording = True
        self.started = True
        self.suspended = False
        self.since = at

    def start_failed(self, message: str) -> None:
        self.error = message

    def session_stopped(self) -> None:
        self.recording = False
        self.since = None

    def write_failed(self, message: str) -> bool:
        """The manifest could not be written: recording has failed (True if that is news)."""
        if self.error is not None:
            return False
        self.error = message
        return True

    # -- the rules ----------------------------------------------------------------------------
    def decide(self) -> Decision:
        """What the state asks for now (also after the relay changed)."""
        if not self.wanted:
            self.started = False
        wanted_now = self.wanted and self.policy != "never" and self.error is None
        if wanted_now and self.policy == "with_consent":
            if self._declined():
                wanted_now = False
                self.started = False
            elif not self.started:
                wanted_now = bool(self.present) and all(
                    self._answer(c) == "agreed" for c in self.present)
        if not wanted_now:
            self.suspended = False
        allowed = self.allowed() if wanted_now else set()
        if wanted_now and allowed:
            if not self.recording:
                return Decision(start=True, allow=frozenset(allowed))
            self.started = True
            return Decision(allow=frozenset(allowed))
        if self.recording and not wanted_now:
            return Decision(stop=True)
        return NOTHING

    def allowed(self) -> set[str]:
        """The participants whose media may be written."""
        if self.policy == "always":
            return set(self.present)
        return {c for c in self.present if self._answer(c) == "agreed"}

    def status(self) -> Status:
        if self.policy == "never":
            return "disabled"
        if self.error:
            return "failed"
        if not self.wanted:
            return "stopped"
        if self.policy == "with_consent":
            if self._declined():
                return "declined"
            if not self.started:
                return "pending" if self.present else "off"
        if (self.recording or self.suspended) and self.allowed():
            return "on"
        return "pending" if self.present else "off"

    def view(self) -> dict[str, Any]:
        """The recording state as clients show it (without the consultation id)."""
        return {
            "status": self.status(),
            "policy": self.policy,
            "consent": [{"clinician_id": c, "answer": a} for c, (a, _) in
                        sorted(self.answers.items()) if c in self.present],
            "since": self.since,
            "error": self.error,
        }

    def archive_status(self, file_statuses: set[str], recorded: str) -> str:
        """The recording's status in the final manifest, from the files' statuses and the
        status recorded so far."""
        if self.error or "failed" in file_statuses:
            return "failed"
        if "interrupted" in file_statuses or recorded == "interrupted":
            return "interrupted"
        if file_statuses:
            return "complete"
        if any(a == "declined" for a, _ in self.answers.values()):
            return "declined"
        return "off"

    def _answer(self, clinician_id: str) -> str:
        return self.answers.get(clinician_id, ("", None))[0]

    def _declined(self) -> bool:
        return any(self._answer(c) == "declined" for c in self.present)
