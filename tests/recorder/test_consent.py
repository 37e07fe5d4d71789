"""recorder/consent.py: the consent and recording state machine, on its own (no files, no
relay): every policy x join, agree, decline, stop, start, failure; the statuses are the ones
clients see in tests/recorder/test_recording.py."""

from __future__ import annotations

import pytest

from recorder.consent import NOTHING, ConsentMachine, Decision, strictest


class Recorder:
    """Carries decisions out the way recorder.service does, with a session that always opens
    (``opens=False``: the relay or the disk refuses it)."""

    def __init__(self, policy: str, *, opens: bool = True) -> None:
        self.machine = ConsentMachine(policy)
        self.opens = opens
        self.recorded: set[str] = set()
        self.starts = 0
        self.stops = 0

    def do(self, decision: Decision) -> Decision:
        machine = self.machine
        if decision.start:
            if self.opens:
                self.starts += 1
                machine.session_started(at=100.0)
            else:
                machine.start_failed("the consultation has no relay")
        if decision.stop:
            self.stops += 1
            machine.session_stopped()
            self.recorded = set()
        if decision.allow is not None and machine.recording:
            self.recorded = set(decision.allow)
        return decision

    def step(self, event: str, who: str = "") -> Decision:
        machine = self.machine
        if event == "join":
            return self.do(machine.join(who, f"site-of-{who}"))
        if event == "leave":
            return self.do(machine.leave(who))
        if event in ("agree", "decline"):
            return self.do(machine.answer(who, event == "agree", at=50.0))
        if event == "stop":
            return self.do(machine.host_stop())
        if event == "start":
            return self.do(machine.host_start())
        if event == "failure":
            return self.do(machine.failure("cannot write a.webm: No space left on device"))
        if event == "relay_changed":
            if machine.recording:
                machine.session_stopped()
            return self.do(machine.decide())
        if event == "ended":
            return self.do(machine.ended())
        raise AssertionError(event)

    def run(self, *steps: str) -> Recorder:
        for step in steps:
            event, _, who = step.partition(" ")
            self.step(event, who)
        return self

    @property
    def status(self) -> str:
        return self.machine.status()


TWO = ("join cardio1", "join ref1")
BOTH_AGREE = (*TWO, "agree cardio1", "agree ref1")

# policy, steps, status clients see, participants being recorded
TABLE = [
    # always: recorded from the start, everyone present
    ("always", ("join cardio1",), "on", {"cardio1"}),
    ("always", TWO, "on", {"cardio1", "ref1"}),
    ("always", (*TWO, "leave ref1"), "on", {"cardio1"}),
    ("always", (*TWO, "stop"), "stopped", set()),
    ("always", (*TWO, "stop", "start"), "on", {"cardio1", "ref1"}),
    ("always", (*TWO, "failure"), "failed", set()),
    ("always", (*TWO, "failure", "join ref2"), "failed", set()),
    ("always", (*TWO, "failure", "start"), "on", {"cardio1", "ref1"}),
    ("always", (*TWO, "relay_changed"), "on", {"cardio1", "ref1"}),
    ("always", (), "off", set()),
    # with_consent: nothing until everyone present agrees; one decline stops it
    ("with_consent", TWO, "pending", set()),
    ("with_consent", (*TWO, "agree cardio1"), "pending", set()),
    ("with_consent", BOTH_AGREE, "on", {"cardio1", "ref1"}),
    ("with_consent", (*TWO, "agree cardio1", "decline ref1"), "declined", set()),
    ("with_consent", (*BOTH_AGREE, "decline ref1"), "declined", set()),
    ("with_consent", (*TWO, "decline ref1", "leave ref1"), "pending", set()),
    ("with_consent", (*TWO, "decline ref1", "leave ref1", "agree cardio1"), "on", {"cardio1"}),
    # a late joiner is asked; recording goes on for the others until they answer
    ("with_consent", (*BOTH_AGREE, "join ref2"), "on", {"cardio1", "ref1"}),
    ("with_consent", (*BOTH_AGREE, "join ref2", "agree ref2"), "on",
     {"cardio1", "ref1", "ref2"}),
    ("with_consent", (*BOTH_AGREE, "join ref2", "decline ref2"), "declined", set()),
    ("with_consent", (*BOTH_AGREE, "stop"), "stopped", set()),
    ("with_consent", (*BOTH_AGREE, "stop", "start"), "on", {"cardio1", "ref1"}),
    ("with_consent", (*TWO, "agree cardio1", "decline ref1", "start"), "pending", set()),
    ("with_consent", (*TWO, "agree cardio1", "decline ref1", "start", "agree ref1"), "on",
     {"cardio1", "ref1"}),
    ("with_consent", (*BOTH_AGREE, "failure"), "failed", set()),
    ("with_consent", (*BOTH_AGREE, "failure", "start"), "on", {"cardio1", "ref1"}),
    ("with_consent", (*BOTH_AGREE, "relay_changed"), "on", {"cardio1", "ref1"}),
    ("with_consent", (), "off", set()),
    # never: nothing, whatever happens
    ("never", TWO, "disabled", set()),
    ("never", (*TWO, "agree cardio1", "agree ref1"), "disabled", set()),
    ("never", (*TWO, "start"), "disabled", set()),
    ("never", (*TWO, "stop"), "disabled", set()),
    ("never", (*TWO, "failure"), "disabled", set()),
]


@pytest.mark.parametrize(("policy", "steps", "status", "recorded"), TABLE,
                         ids=[f"{p}: {', '.join(s) or 'nobody'}" for p, s, _, _ in TABLE])
def test_every_policy_and_event_gives_the_status_clients_see(
    policy: str, steps: tuple[str, ...], status: str, recorded: set[str],
) -> None:
    recorder = Recorder(policy).run(*steps)
    assert recorder.status == status
    assert recorder.recorded == recorded
    assert recorder.machine.recording == (status == "on")


def test_always_opens_one_session_and_widens_it_as_people_join() -> None:
    recorder = Recorder("always")
    first = recorder.step("join", "cardio1")
    assert first == Decision(start=True, allow=frozenset({"cardio1"}))
    second = recorder.step("join", "ref1")
    assert second == Decision(allow=frozenset({"cardio1", "ref1"}))
    assert recorder.starts == 1
    assert recorder.machine.since == 100.0


def test_with_consent_asks_everyone_and_shows_only_those_present() -> None:
    recorder = Recorder("with_consent").run(*TWO, "agree cardio1")
    view = recorder.machine.view()
    assert view == {"status": "pending", "policy": "with_consent", "since": None,
                    "error": None, "consent": [{"clinician_id": "cardio1", "answer": "agreed"},
                                               {"clinician_id": "ref1", "answer": "pending"}]}
    recorder.run("leave ref1")
    assert recorder.machine.view()["consent"] == [{"clinician_id": "cardio1",
                                                   "answer": "agreed"}]
    assert "ref1" not in recorder.machine.answers  # a pending question goes with them


def test_an_answer_is_kept_across_leaving_and_rejoining() -> None:
    recorder = Recorder("with_consent").run(*TWO, "agree ref1", "leave ref1", "join ref1")
    assert recorder.machine.answers["ref1"] == ("agreed", 50.0)


def test_a_decline_closes_the_session_and_a_new_request_asks_again() -> None:
    recorder = Recorder("with_consent").run(*BOTH_AGREE)
    assert recorder.step("decline", "ref1") == Decision(stop=True)
    assert recorder.stops == 1
    assert recorder.step("start") == NOTHING
    assert recorder.machine.answers["ref1"] == ("pending", None)
    assert recorder.machine.answers["cardio1"] == ("agreed", 50.0)


def test_the_host_stopping_closes_the_session_once() -> None:
    recorder = Recorder("always").run(*TWO)
    assert recorder.step("stop") == Decision(stop=True)
    assert recorder.step("join", "ref2") == NOTHING
    assert recorder.step("stop") == NOTHING
    assert recorder.stops == 1
    assert recorder.machine.since is None


def test_a_failure_stops_recording_until_the_host_starts_it_again() -> None:
    recorder = Recorder("always").run(*TWO)
    assert recorder.step("failure") == Decision(stop=True)
    assert recorder.machine.error == "cannot write a.webm: No space left on device"
    assert recorder.step("failure") == NOTHING  # the session is already stopped
    assert recorder.step("join", "ref2") == NOTHING
    assert recorder.step("start").start
    assert recorder.machine.error is None
    assert recorder.status == "on"


def test_a_session_that_cannot_open_fails_the_recording() -> None:
    recorder = Recorder("always", opens=False).run("join cardio1")
    assert recorder.status == "failed"
    assert recorder.machine.error == "the consultation has no relay"
    assert recorder.step("join", "ref1") == NOTHING  # no retry until the host asks


def test_a_manifest_that_cannot_be_written_fails_the_recording_once() -> None:
    recorder = Recorder("always").run(*TWO)
    assert recorder.machine.write_failed("cannot write the manifest: No space left on device")
    assert not recorder.machine.write_failed("again")
    assert recorder.status == "failed"
    assert recorder.machine.decide() == Decision(stop=True)


def test_the_consultation_ending_closes_the_session() -> None:
    recorder = Recorder("always").run(*TWO)
    assert recorder.step("ended") == Decision(stop=True)
    assert recorder.step("ended") == NOTHING


@pytest.mark.parametrize(("error", "files", "recorded", "declined", "final"), [
    (None, {"complete"}, "stopped", False, "complete"),
    ("disk full", {"complete"}, "failed", False, "failed"),
    (None, {"complete", "failed"}, "stopped", False, "failed"),
    (None, {"complete", "interrupted"}, "stopped", False, "interrupted"),
    (None, set(), "interrupted", False, "interrupted"),
    (None, set(), "off", True, "declined"),
    (None, set(), "off", False, "off"),
])
def test_the_archive_status_when_the_consultation_ends(
    error: str | None, files: set[str], recorded: str, declined: bool, final: str,
) -> None:
    machine = ConsentMachine("with_consent", error=error)
    if declined:
        machine.answers["ref1"] = ("declined", 1.0)
    assert machine.archive_status(files, recorded) == final


def test_the_strictest_policy_of_the_sites_wins() -> None:
    assert strictest(["always", "with_consent"]) == "with_consent"
    assert strictest(["always", "never", "with_consent"]) == "never"
    assert strictest(["always"]) == "always"
    assert strictest([]) == "with_consent"
